"""The training loop: task loss + lambda * sparsity term, evaluation, checkpoints, resume.

Why a hand-written loop and not transformers.Trainer: exact resume needs the data
position and every RNG under our control, checkpoints must be pickle-free, every
evaluation must report MEASURED sparsity, and the service cancels through a callback's
return value. The loop is plain PyTorch and reads top to bottom.

``train`` is the sequence of its stages: the set-up before the first step
(core.train_setup: records, gated model, encoded examples, optimizer and schedule), the
run directory and resume (``_restore``), the step loop with its evaluations (``_Loop``),
then the final state (``_finish``). Everything it writes goes through core.rundir.

"Best" checkpoint rule (documented for users): an evaluation is eligible to be the best
only when the measured sparsity is within ``sparsity_tolerance`` of the target (a dense
early model would otherwise always win on accuracy; with objective "paper", at least the
target minus the tolerance). Early-stopping patience counts
eligible evaluations only. final/ holds the BEST eligible state; if no evaluation was
eligible, final/ holds the last state and ``info["target_reached"]`` is false.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from core import __version__ as ENGINE_VERSION
from core import checkpoint as ckpt
from core import gatemap
from core.callbacks import CallbackList, CheckpointRecord, EvalRecord, StepRecord, TrainerCallback
from core.config import Hyperparameters, JobConfig
from core.distill import kl_loss, teacher_logits
from core.errors import FineGatesError, TrainingError
from core.gates import gated_modules, gates_open
from core.metrics import classification_metrics, is_better, perplexity, regression_metrics
from core.rundir import FINAL_FORMAT, GatedInfo, RunConfig, RunDir, TrainResult, load_gated_run
from core.tokenize import Collator
from core.train_setup import (
    JobData,
    ModelSetup,
    Schedule,
    Tokens,
    build_model,
    build_schedule,
    calibrate,
    default_data_dir,
    encode_data,
    prepare_data,
    seed_everything,
)

__all__ = ["train", "TrainResult", "load_gated_run", "evaluate", "default_data_dir"]


# ----------------------------------------------------------------------------- sparsity
def _measure(model: nn.Module) -> dict[str, Any]:
    """Measured sparsity = what pruning removes (core.structure), plus per-type shares."""
    from core import structure

    st = structure.sparsity_by_type(model)
    return {
        "measured_sparsity": float(st.measured_sparsity),
        "sparsity_by_type": {k: float(v) for k, v in st.by_type.items()},
        "removable_params": int(st.removable_params),
        "gated_params": int(st.gated_params),
        "paper_sparsity": float(st.paper_sparsity),
    }


def _eligible(measured: float, hp: Hyperparameters) -> bool:
    """May this evaluation be the "best"? Calibrated: measured within +-tolerance of the
    target (the promise users get). Paper: at least the target (its target is not the
    removed fraction, so it overshoots by design)."""
    tol, tgt = float(hp.sparsity_tolerance), float(hp.target_sparsity)
    if hp.objective == "paper":
        return measured >= tgt - tol
    return abs(measured - tgt) <= tol + 1e-9


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


# ----------------------------------------------------------------------------- resume
@dataclass
class _Progress:
    """Where the run stands; a checkpoint stores and restores exactly this."""

    step: int = 0
    epoch: int = 0
    micro_idx: int = 0
    tokens: int = 0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    since_best: int = 0
    last_measured: float | None = None
    recovering_since: int | None = None  # the step the recovery phase froze the gates

    def extra(self, reason: str) -> dict[str, Any]:
        return {
            "recovering_since": self.recovering_since,
            "tokens": self.tokens,
            "best_value": self.best_value,
            "best_step": self.best_step,
            "best_metrics": self.best_metrics,
            "since_best": self.since_best,
            "measured_sparsity": self.last_measured,
            "reason": reason,
        }


def _restore(rd: RunDir, resume: bool, model: nn.Module, sch: Schedule) -> _Progress:
    """The latest checkpoint's progress (model, optimizer, RNG restored), or a fresh start."""
    latest = ckpt.latest_checkpoint(rd.checkpoints) if resume else None
    if latest is None:
        rd.reset_progress()
        return _Progress()
    st = ckpt.load_checkpoint(latest, model=model, optimizer=sch.optimizer, scheduler=sch.scheduler)
    if st.get("objective") and hasattr(sch.objective, "load_state_dict"):
        sch.objective.load_state_dict(st["objective"])
    ex = st.get("extra", {})
    p = _Progress(
        step=int(st["step"]),
        epoch=int(st["data_position"]["epoch"]),
        micro_idx=int(st["data_position"]["micro_batch"]),
        tokens=int(ex.get("tokens", 0)),
        best_value=ex.get("best_value"),
        best_step=ex.get("best_step"),
        best_metrics=ex.get("best_metrics", {}),
        since_best=int(ex.get("since_best", 0)),
        last_measured=ex.get("measured_sparsity"),
        recovering_since=ex.get("recovering_since"),
    )
    if p.recovering_since is not None:
        _freeze_gates(model)
    rd.truncate_metrics(p.step)
    return p


def _freeze_gates(model: nn.Module) -> None:
    """The recovery phase (method.md §2.10): the gates stop moving and stop drawing noise,
    so training sees exactly the eval gates the pruned model will have."""
    for gm in gated_modules(model).values():
        gm.noise_std = 0.0


def _drop_gate_grads(model: nn.Module) -> None:
    """Recovery: the gates get no update (grad None: AdamW skips them, state untouched).
    They keep requires_grad so checkpoints still hold them."""
    for gm in gated_modules(model).values():
        gm.row_logits.grad = None
        gm.col_logits.grad = None


# ----------------------------------------------------------------------------- eval
@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[dict],
    collate: Collator,
    task: str,
    problem_type: str | None,
    batch_size: int,
    device: torch.device,
    autocast: Any,
    max_batches: int | None = None,
) -> dict[str, float]:
    """Task metrics on eval gates (model.eval() makes the gates deterministic)."""
    was_training = model.training
    model.eval()
    preds: list[Any] = []
    golds: list[Any] = []
    nll, ntok, loss_sum, n_b = 0.0, 0, 0.0, 0
    for b, s in enumerate(range(0, len(examples), batch_size)):
        if max_batches is not None and b >= max_batches:
            break
        batch = {k: v.to(device) for k, v in collate(examples[s : s + batch_size]).items()}
        with autocast():
            out = model(**batch)
        loss_sum += float(out.loss.detach())
        n_b += 1
        if task == "classification":
            logits = out.logits.float()
            if problem_type == "regression":
                preds.extend(logits.view(-1).tolist())
            else:
                preds.extend(logits.argmax(-1).tolist())
            golds.extend(batch["labels"].tolist())
        else:
            logits = out.logits.float()[:, :-1]  # (B, T-1, V)
            tgt = batch["labels"][:, 1:]
            m = tgt != -100
            lp = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                reduction="sum",
            )  # fmt: skip
            nll += float(lp)
            ntok += int(m.sum())
    if was_training:
        model.train()
    metrics: dict[str, float] = {"eval_loss": loss_sum / max(1, n_b)}
    if task == "classification":
        if problem_type == "regression":
            metrics.update(regression_metrics(preds, golds))
        else:
            metrics.update(classification_metrics(preds, golds))
    else:
        metrics["perplexity"] = perplexity(nll, ntok)
    return metrics


# ----------------------------------------------------------------------------- step loop
class _Loop:
    """Optimizer steps, periodic evaluation and checkpoints, until the end or a stop."""

    def __init__(
        self, rd: RunDir, model: nn.Module, data: JobData, tokens: Tokens, sch: Schedule,
        progress: _Progress, cb: CallbackList, seed: int,
    ) -> None:  # fmt: skip
        self.rd, self.model, self.data, self.tok, self.sch = rd, model, data, tokens, sch
        self.p, self.cb, self.seed = progress, cb, seed
        self.hp = tokens.hp

    def save_checkpoint(self, reason: str) -> Path:
        p, sch = self.p, self.sch
        self.cb.before_write("checkpoint")
        d = ckpt.save_checkpoint(
            self.rd.step_dir(p.step),
            model=self.model,
            optimizer=sch.optimizer,
            scheduler=sch.scheduler,
            step=p.step,
            data_position={"epoch": p.epoch, "micro_batch": p.micro_idx},
            objective_state=(
                sch.objective.state_dict() if hasattr(sch.objective, "state_dict") else {}
            ),
            extra=p.extra(reason),
        )
        ckpt.prune_checkpoints(
            self.rd.checkpoints,
            int(self.hp.n_checkpoints),
            {p.best_step} if p.best_step is not None else set(),
        )
        return d

    def evaluate(self) -> tuple[EvalRecord, bool]:
        """One evaluation (metrics + measured sparsity), the best/patience bookkeeping and
        its metrics.jsonl row. Returns (record, early stop reached)."""
        p, sch, hp, tok = self.p, self.sch, self.hp, self.tok
        m = evaluate(
            self.model, tok.val.examples or tok.train.examples[: sch.batch_size], tok.collate,
            self.data.task, self.data.problem_type, sch.batch_size, sch.device, sch.autocast,
            hp.eval_max_batches,
        )  # fmt: skip
        sp = _measure(self.model)
        p.last_measured = measured = sp["measured_sparsity"]
        if hasattr(sch.objective, "update"):
            sch.objective.update(measured, p.step)
        is_best = False
        early = False
        if (
            hp.recovery and p.recovering_since is None and _eligible(measured, hp)
            and sch.objective.target_at(p.step) >= float(hp.target_sparsity)
        ):  # fmt: skip
            p.recovering_since = p.step
            _freeze_gates(self.model)
        if _eligible(measured, hp):
            if is_better(m.get(sch.metric_name), p.best_value, sch.metric_mode):
                p.best_value, p.best_step, p.best_metrics = (
                    float(m[sch.metric_name]),
                    p.step,
                    dict(m),
                )
                p.since_best, is_best = 0, True
            else:
                p.since_best += 1
                if hp.early_stopping_patience and p.since_best >= hp.early_stopping_patience:
                    early = True
        rec = EvalRecord(
            step=p.step,
            total_steps=sch.total_steps,
            metrics=m,
            measured_sparsity=measured,
            sparsity_by_type=sp["sparsity_by_type"],
            removable_params=sp["removable_params"],
            gated_params=sp["gated_params"],
            is_best=is_best,
            gates=gatemap.snapshot(self.model, p.step),
        )
        row = {"step": p.step, "epoch": round(p.step / max(1, sch.steps_per_epoch), 4), **m}
        row.update(
            measured_sparsity=measured,
            sparsity_by_type=sp["sparsity_by_type"],
            removable_params=sp["removable_params"],
            gated_params=sp["gated_params"],
            target_sparsity=float(hp.target_sparsity),
            is_best=is_best,
        )
        self.rd.append_metrics(row)
        return rec, early

    def evaluate_dense(self) -> EvalRecord:
        """Step 0 of a language-model run: the dense starting point (gates open), so every
        run shows its own reference perplexity. Not a candidate for "best"."""
        sch, hp, tok = self.sch, self.hp, self.tok
        with gates_open(self.model):
            m = evaluate(
                self.model, tok.val.examples or tok.train.examples[: sch.batch_size],
                tok.collate, self.data.task, self.data.problem_type, sch.batch_size,
                sch.device, sch.autocast, hp.eval_max_batches,
            )  # fmt: skip
        sp = _measure(self.model)
        rec = EvalRecord(
            step=0, total_steps=sch.total_steps, metrics=m, measured_sparsity=0.0,
            sparsity_by_type=dict.fromkeys(sp["sparsity_by_type"], 0.0),
            removable_params=0, gated_params=sp["gated_params"], is_best=False,
        )  # fmt: skip
        row: dict[str, Any] = {"step": 0, "epoch": 0.0, **m, "measured_sparsity": 0.0}
        row.update(
            sparsity_by_type=rec.sparsity_by_type, removable_params=0,
            gated_params=sp["gated_params"], target_sparsity=float(hp.target_sparsity),
            is_best=False, dense=True,
        )  # fmt: skip
        self.rd.append_metrics(row)
        return rec

    def _distill_weight(self) -> float:
        return 0.0 if not self.hp.distillation else float(self.hp.distillation)

    def _step(self, order: list[int]) -> tuple[float, float, float, int, float]:
        """One optimizer step over up to ``accum`` micro-batches of ``order``.
        Returns (task loss, sparsity term, weighted sparsity loss, examples seen,
        distillation loss)."""
        p, sch, model, examples = self.p, self.sch, self.model, self.tok.train.examples
        bs = sch.batch_size
        n_micro = min(sch.accum, sch.micro_per_epoch - p.micro_idx)
        sch.optimizer.zero_grad(set_to_none=True)
        task_loss_v = 0.0
        distill_v = 0.0
        step_examples = 0
        w_kd = self._distill_weight()
        for _ in range(n_micro):
            idx = order[p.micro_idx * bs : (p.micro_idx + 1) * bs]
            batch = self.tok.collate([examples[i] for i in idx])
            batch = {k: v.to(sch.device) for k, v in batch.items()}
            teacher = teacher_logits(model, batch, sch.autocast) if w_kd > 0 else None
            with sch.autocast():
                out = model(**batch)
            loss = out.loss.float() / n_micro
            task_loss_v += float(loss.detach())
            if teacher is not None:
                kd = kl_loss(out.logits, teacher, batch.get("labels"), self.hp.distill_temperature)
                kd = w_kd * kd / n_micro
                distill_v += float(kd.detach())
                loss = loss + kd
            loss.backward()
            step_examples += len(idx)
            p.tokens += int(batch["attention_mask"].sum())
            p.micro_idx += 1
        # lambda * term, already zero before sparsity_start_step; none while recovering
        sp_v = weighted_sp = 0.0
        if p.recovering_since is None:
            sp_loss, sp_parts = sch.objective.loss(model, p.step)
            if sp_loss.requires_grad:
                sp_loss.backward()
            sp_v = float(sp_parts.get("sparsity_term", 0.0))
            weighted_sp = float(sp_loss.detach())
        if p.recovering_since is not None:
            _drop_gate_grads(model)
        if not math.isfinite(task_loss_v):
            raise TrainingError(f"task loss became {task_loss_v} at step {p.step + 1}")
        if self.hp.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(
                [q for q in model.parameters() if q.requires_grad], float(self.hp.max_grad_norm)
            )
        sch.optimizer.step()
        sch.scheduler.step()
        p.step += 1
        return task_loss_v, sp_v, weighted_sp, step_examples, distill_v

    def run(self) -> str:
        """Train to the end or to a stop; returns the status ("completed", "stopped",
        "early_stopped")."""
        p, sch, cb = self.p, self.sch, self.cb
        total, per_epoch = sch.total_steps, sch.micro_per_epoch
        interval, ck_interval = int(self.hp.eval_interval), int(self.hp.checkpoint_interval)
        status = "completed"
        t0 = time.perf_counter()
        start_step = p.step
        seen_examples = 0
        go_on = True
        if p.step == 0 and self.data.task in ("causal_lm", "sparsify"):
            if cb.on_eval(self.evaluate_dense()) is False:
                go_on = False
        try:
            while p.step < total and go_on:
                order = _epoch_order(len(self.tok.train.examples), self.seed, p.epoch)
                while p.micro_idx < per_epoch and p.step < total:
                    task_loss_v, sp_v, weighted_sp, n_ex, kd_v = self._step(order)
                    seen_examples += n_ex
                    elapsed = time.perf_counter() - t0
                    done = p.step - start_step
                    srec = StepRecord(
                        step=p.step,
                        total_steps=total,
                        epoch=p.epoch + p.micro_idx / per_epoch,
                        loss=task_loss_v + weighted_sp + kd_v,
                        task_loss=task_loss_v,
                        sparsity_loss=sp_v,
                        lr=float(sch.optimizer.param_groups[0]["lr"]),
                        examples_per_second=seen_examples / elapsed if elapsed > 0 else 0.0,
                        eta_seconds=elapsed / done * (total - p.step) if done else None,
                        measured_sparsity=p.last_measured,
                        tokens=p.tokens,
                        distill_loss=kd_v,
                    )
                    if cb.on_step(srec) is False:
                        go_on = False
                    last = p.step >= total
                    if p.step % interval == 0 or last:
                        erec, early = self.evaluate()
                        if cb.on_eval(erec) is False:
                            go_on = False
                        if early:
                            status = "early_stopped"
                            go_on = False
                        if erec.is_best and p.step % ck_interval != 0 and not last and go_on:
                            d = self.save_checkpoint("best")
                            rec = CheckpointRecord(p.step, str(d), erec.metrics, p.last_measured)
                            if cb.on_checkpoint(rec) is False:
                                go_on = False
                    new_epoch = p.micro_idx >= per_epoch
                    if new_epoch:
                        p.epoch, p.micro_idx = p.epoch + 1, 0
                    if p.step % ck_interval == 0 or last or not go_on:
                        d = self.save_checkpoint("periodic" if go_on else "stop")
                        crec = CheckpointRecord(
                            p.step, str(d), dict(p.best_metrics), p.last_measured
                        )
                        if cb.on_checkpoint(crec) is False:
                            go_on = False
                    if not go_on or new_epoch:
                        break  # a new epoch draws its own order (the outer loop)
                else:
                    if p.micro_idx >= per_epoch:
                        p.epoch, p.micro_idx = p.epoch + 1, 0
            if not go_on and status != "early_stopped" and p.step < total:
                status = "stopped"
        except FineGatesError:
            raise
        except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
            raise TrainingError(f"out of GPU memory at step {p.step}; lower batch_size") from exc
        return status


# ----------------------------------------------------------------------------- final state
def _final_info(
    config: JobConfig, data: JobData, setup: ModelSetup, tokens: Tokens, p: _Progress,
    target_reached: bool, sp: dict[str, Any],
) -> GatedInfo:  # fmt: skip
    hp = tokens.hp
    return {
        "format": FINAL_FORMAT,
        "engine_version": ENGINE_VERSION,
        "base_model": config.model,
        "base_model_path": str(setup.model_path),
        "family": setup.base.family,
        "task": data.task,
        "problem_type": data.problem_type,
        "labels": data.labels,
        "kind": data.kind,
        "targets": hp.targets,
        "gated_modules": list(gated_modules(setup.model)),
        "gate_config": asdict(setup.gate_cfg),
        "trainable": hp.trainable,
        "head_modules": setup.heads,
        "step": p.step if p.best_step is None else p.best_step,
        "best_step": p.best_step,
        "target_reached": target_reached,
        "target_sparsity": float(hp.target_sparsity),
        "objective": hp.objective,
        "measured_sparsity": sp["measured_sparsity"],
        "sparsity_by_type": sp["sparsity_by_type"],
        "removable_params": sp["removable_params"],
        "gated_params": sp["gated_params"],
        "metrics": p.best_metrics,
        "max_length": tokens.max_len,
        "hyperparameters": hp.to_dict(),
        "column_groups": {
            n: g.col_group for n, g in gated_modules(setup.model).items() if g.col_group > 1
        },
        "compensated": [
            n for n, g in gated_modules(setup.model).items() if g.comp_mean is not None
        ],
    }


def _finish(
    rd: RunDir, config: JobConfig, data: JobData, setup: ModelSetup, tokens: Tokens,
    sch: Schedule, p: _Progress, status: str,
) -> TrainResult:  # fmt: skip
    """final/ = the best eligible state (or the last one), then result.json."""
    model = setup.model
    target_reached = p.best_step is not None
    if target_reached and p.best_step != p.step:
        ckpt.load_trainable(rd.step_dir(cast(int, p.best_step)), model)
    model.eval()
    final_sp = _measure(model)
    info = _final_info(config, data, setup, tokens, p, target_reached, final_sp)
    model.to("cpu")
    final_dir = rd.write_final(model, setup.tokenizer, info)
    result = TrainResult(
        status=status,
        steps=p.step,
        total_steps=sch.total_steps,
        best_step=p.best_step,
        best_metrics=p.best_metrics,
        measured_sparsity=final_sp["measured_sparsity"],
        final_dir=str(final_dir),
        run_dir=str(rd.root),
        trained_tokens=p.tokens,
        target_reached=target_reached,
    )
    rd.write_result(result)
    return result


# ----------------------------------------------------------------------------- main entry
def train(
    config: JobConfig,
    run_dir: Path | str,
    callback: TrainerCallback | None = None,
    resume: bool = True,
    device: str | None = None,
) -> TrainResult:
    """Run (or resume) one job and write the run directory; see the module docstring."""
    rd = RunDir(run_dir)
    rd.prepare()
    if resume and rd.has_final():
        done = rd.read_result()
        if done is not None:
            return done
    if not resume:
        rd.forget_result()
    cb = CallbackList(callback)
    seed = config.effective_seed
    seed_everything(seed)

    data = prepare_data(config)
    setup = build_model(config, data, seed)
    tokens = encode_data(config, data, setup)
    hp, model = tokens.hp, setup.model
    n_train = len(tokens.train.examples)
    sch = build_schedule(model, hp, n_train, data.task, data.problem_type, device)

    resolved = config.to_dict()
    resolved["task"] = data.task
    resolved["hyperparameters"] = hp.to_dict()
    resolved["labels"] = data.labels
    run_config: RunConfig = {
        "config": resolved,
        "engine_version": ENGINE_VERSION,
        "model_path": str(setup.model_path),
        "family": setup.base.family,
        "n_train_examples": n_train,
        "n_val_examples": len(tokens.val.examples),
        "total_steps": sch.total_steps,
        "trainable_params": sum(q.numel() for q in model.parameters() if q.requires_grad),
        "warnings": data.warnings,
        "calibration": {},
    }
    rd.save_tokenizer(setup.tokenizer)

    run_config["calibration"] = calibrate(model, hp, tokens, sch.device)
    rd.write_config(run_config)
    progress = _restore(rd, resume, model, sch)
    status = _Loop(rd, model, data, tokens, sch, progress, cb, seed).run()
    if status == "stopped":
        return TrainResult(
            status=status, steps=progress.step, total_steps=sch.total_steps,
            best_step=progress.best_step, best_metrics=progress.best_metrics,
            measured_sparsity=progress.last_measured, final_dir=None, run_dir=str(rd.root),
            trained_tokens=progress.tokens, target_reached=progress.best_step is not None,
        )  # fmt: skip
    cb.before_write("final")
    return _finish(rd, config, data, setup, tokens, sch, progress, status)
