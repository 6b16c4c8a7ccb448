"""The training loop: task loss + lambda * sparsity term, evaluation, checkpoints, resume.

Why a hand-written loop and not transformers.Trainer: exact resume needs the data
position and every RNG under our control, checkpoints must be pickle-free, every
evaluation must report MEASURED sparsity, and the service cancels through a callback's
return value. The loop is plain PyTorch and reads top to bottom.

"Best" checkpoint rule (documented for users): an evaluation is eligible to be the best
only when the measured sparsity is within ``sparsity_tolerance`` of the target (a dense
early model would otherwise always win on accuracy; with objective "paper", at least the
target minus the tolerance). Early-stopping patience counts
eligible evaluations only. final/ holds the BEST eligible state; if no evaluation was
eligible, final/ holds the last state and ``info["target_reached"]`` is false.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from core import __version__ as ENGINE_VERSION
from core import checkpoint as ckpt
from core.callbacks import CallbackList, CheckpointRecord, EvalRecord, StepRecord, TrainerCallback
from core.catalog import resolve_model
from core.config import Hyperparameters, JobConfig
from core.data import LoadedData, load_records, split_validation
from core.errors import ConfigError, DataError, FineGatesError, TrainingError
from core.gates import (
    GateConfig,
    configure_trainable,
    default_head_modules,
    gated_modules,
    inject_gates,
    param_groups,
    set_input_recording,
)
from core.metrics import (
    classification_metrics,
    is_better,
    perplexity,
    primary_metric,
    regression_metrics,
)
from core.modeling import LoadedBase, load_base, load_tokenizer
from core.tokenize import Collator, Encoded, encode_classification, encode_lm

FINAL_STATE = "gated_state.safetensors"
FINAL_INFO = "gated_model.json"


@dataclass
class TrainResult:
    status: str  # "completed" | "stopped" | "early_stopped"
    steps: int
    total_steps: int
    best_step: int | None
    best_metrics: dict[str, float]
    measured_sparsity: float | None
    final_dir: str | None
    run_dir: str
    trained_tokens: int = 0
    target_reached: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_data_dir() -> Path:
    return Path(os.environ.get("FINEGATES_DATA_DIR", Path.home() / ".cache" / "finegates"))


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


def _make_objective(hp: Hyperparameters, total_steps: int) -> Any:
    from core.objective import SparsityObjective

    return SparsityObjective(
        objective=hp.objective,
        target_sparsity=float(hp.target_sparsity),
        sparsity_weight=float(hp.sparsity_weight),
        sparsity_start_step=int(hp.sparsity_start_step),
        target_warmup_steps=int(round(float(hp.sparsity_warmup_ratio) * total_steps)),
        kurtosis=bool(hp.kurtosis),
        focus=bool(hp.sparsity_focus),
    )


# ----------------------------------------------------------------------------- schedule
def _lr_lambda(hp: Hyperparameters, total_steps: int):
    warm = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_ratio * total_steps)
    kind = hp.scheduler

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = (step - warm) / max(1, total_steps - warm)
        progress = min(max(progress, 0.0), 1.0)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


# ----------------------------------------------------------------------------- data
@dataclass
class _Prepared:
    task: str
    kind: str
    problem_type: str | None
    labels: list[str] | None
    train: Encoded
    val: Encoded
    n_train_rows: int
    n_val_rows: int
    warnings: list[str]


def _load_data(config: JobConfig) -> tuple[str, LoadedData, list[dict], list[dict]]:
    cols: dict[str, Any] = {
        "text_column": config.text_column,
        "text_pair_column": config.text_pair_column,
        "label_column": config.label_column,
    }
    tr = load_records(config.training_file, config.task, **cols)
    task = config.task or tr.report.task
    if config.validation_file:
        va = load_records(config.validation_file, task, **cols)
        if va.report.kind != tr.report.kind and not (
            task in ("causal_lm", "sparsify") and va.report.kind == "text"
        ):
            raise DataError(
                f"validation format '{va.report.kind}' differs from training format "
                f"'{tr.report.kind}'",
                file=config.validation_file,
            )
        if tr.report.problem_type != va.report.problem_type:
            raise DataError(
                f"validation labels are {va.report.problem_type}, training labels are "
                f"{tr.report.problem_type}",
                file=config.validation_file,
                field=config.label_column,
            )
        train_recs, val_recs = tr.records, va.records
    else:
        train_recs, val_recs = split_validation(
            tr.records,
            fraction=config.validation_split or 0.1,
            max_rows=config.max_validation_rows,
            seed=config.effective_seed,
        )
    return task, tr, train_recs, val_recs


def _encode(
    task: str, kind: str, records: list[dict], tokenizer: Any, max_length: int,
    label2id: dict[str, int] | None,
) -> Encoded:  # fmt: skip
    if task == "classification":
        return encode_classification(records, tokenizer, max_length, label2id)
    return encode_lm(records, tokenizer, max_length, kind)


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


# ----------------------------------------------------------------------------- final state
def save_final(
    final_dir: Path,
    model: nn.Module,
    tokenizer: Any,
    info: dict[str, Any],
) -> Path:
    """All weights needed to rebuild the gated model (base + gates + head) + JSON info."""
    from safetensors.torch import save_model

    tmp = final_dir.parent / f".{final_dir.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / FINAL_STATE))
    cast(Any, model.config).save_pretrained(str(tmp))  # an HF PretrainedConfig
    (tmp / FINAL_INFO).write_text(json.dumps(info, indent=2, default=float), "utf-8")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
    return final_dir


def load_gated_run(run_dir: Path | str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild the gated model from ``run_dir/final`` (eval mode, fp32) for pruning/serving.

    The skeleton comes from the saved HF config (no code is run), the gates are injected
    at the exact module names recorded, then ALL tensors load strictly from safetensors.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    run_dir = Path(run_dir)
    final = run_dir / "final" if (run_dir / "final" / FINAL_INFO).is_file() else run_dir
    info_path = final / FINAL_INFO
    if not info_path.is_file():
        raise TrainingError(f"{run_dir}: no final gated state ({FINAL_INFO} missing)")
    info = json.loads(info_path.read_text("utf-8"))
    cfg = AutoConfig.from_pretrained(str(final), trust_remote_code=False)
    cls = (
        AutoModelForSequenceClassification
        if info["task"] == "classification"
        else AutoModelForCausalLM
    )
    model = cls.from_config(cfg, dtype=torch.float32)
    inject_gates(model, list(info["gated_modules"]), GateConfig.from_dict(info["gate_config"]))
    missing, unexpected = load_model(model, str(final / FINAL_STATE), strict=True)
    if missing or unexpected:
        raise TrainingError(f"final state does not fit: missing={missing} unexpected={unexpected}")
    tok_dir = final / "tokenizer" if (final / "tokenizer").is_dir() else run_dir / "tokenizer"
    tokenizer = load_tokenizer(tok_dir, info.get("family"))
    model.eval()
    return model, tokenizer, info


# ----------------------------------------------------------------------------- helpers
def _pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast_factory(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device_type=device.type, enabled=False)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def _append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj, default=float) + "\n")


def _eligible(measured: float, hp: Hyperparameters) -> bool:
    """May this evaluation be the "best"? Calibrated: measured within +-tolerance of the
    target (the promise users get). Paper: at least the target (its target is not the
    removed fraction, so it overshoots by design)."""
    tol, tgt = float(hp.sparsity_tolerance), float(hp.target_sparsity)
    if hp.objective == "paper":
        return measured >= tgt - tol
    return abs(measured - tgt) <= tol + 1e-9


# ----------------------------------------------------------------------------- main entry
def train(
    config: JobConfig,
    run_dir: Path | str,
    callback: TrainerCallback | None = None,
    resume: bool = True,
    device: str | None = None,
) -> TrainResult:
    """Run (or resume) one job and write the run directory; see the module docstring."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.json"
    if resume and result_path.is_file() and (run_dir / "final" / FINAL_INFO).is_file():
        return TrainResult(**json.loads(result_path.read_text("utf-8")))
    if not resume:
        result_path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "final", ignore_errors=True)
    cb = CallbackList(callback)
    hp_in = config.hyperparameters
    seed = config.effective_seed
    _seed_everything(seed)

    # --- data -------------------------------------------------------------------------
    task, train_data, train_recs, val_recs = _load_data(config)
    report = train_data.report
    kind = report.kind
    problem_type = report.problem_type if task == "classification" else None
    labels = config.labels or report.labels
    if task == "classification" and problem_type != "regression":
        assert labels is not None
        unknown = sorted({r["label"] for r in train_recs + val_recs} - set(labels))
        if unknown:
            raise ConfigError("labels", f"data has labels not in the configured list: {unknown}")
    if task == "sparsify" and hp_in.trainable != "gates":
        raise ConfigError("trainable", "task 'sparsify' trains gates only; use 'gates'")

    # --- model ------------------------------------------------------------------------
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
    model_path = resolve_model(
        config.model, data_dir, allow_hub=config.allow_hub, allow_paths=config.allow_paths
    )
    hp = hp_in.resolve(len(train_recs), task)
    _seed_everything(seed)
    base: LoadedBase = load_base(model_path, task, labels=labels, problem_type=problem_type)
    model, tokenizer = base.model, base.tokenizer
    gate_cfg = GateConfig(
        init_mean=hp.gate_init_mean,
        init_std=hp.gate_init_std,
        noise_std=hp.gate_noise_std,
        lora_rank=hp.lora_rank if hp.trainable == "gates+lora" else 0,
        seed=seed,
    )
    try:
        gated = inject_gates(model, hp.targets, gate_cfg)
    except ConfigError as exc:
        raise ConfigError("targets", exc.reason) from exc
    heads = list(dict.fromkeys(default_head_modules(model) + base.new_modules))
    heads = [h for h in heads if h not in gated and not any(h.startswith(g + ".") for g in gated)]
    configure_trainable(model, hp.trainable, head_modules=heads)
    if hp.kurtosis:
        set_input_recording(model, True)

    # --- tokens -----------------------------------------------------------------------
    label2id = (
        {lab: i for i, lab in enumerate(cast(list[str], labels))}  # asserted set above
        if task == "classification" and problem_type != "regression"
        else None
    )
    max_len = int(hp.max_length)
    model_max = getattr(model.config, "max_position_embeddings", None)
    if model_max:
        max_len = min(max_len, int(model_max))
    enc_train = _encode(task, kind, train_recs, tokenizer, max_len, label2id)
    enc_val = _encode(task, kind, val_recs, tokenizer, max_len, label2id)
    if not enc_train.examples:
        raise DataError(
            f"no training example has tokens to learn from after truncation (max_length {max_len})",
            file=config.training_file,
        )
    lm = task != "classification"
    collate = Collator(tokenizer.pad_token_id or 0, lm=lm)
    # "auto" values that depend on the encoded size (text is chunked) are resolved here.
    hp = hp_in.resolve(len(enc_train.examples), task)
    hp.max_length = max_len

    # --- device, optimizer, schedule --------------------------------------------------
    dev = _pick_device(device)
    model.to(dev)
    model.train()
    autocast = _autocast_factory(dev, hp.precision)
    groups = param_groups(
        model,
        gate_lr=float(hp.learning_rate),
        head_lr=float(hp.head_learning_rate),
        lora_lr=float(hp.lora_learning_rate),
        weight_lr=float(hp.weight_learning_rate),
        weight_decay=float(hp.weight_decay),
    )
    optimizer = torch.optim.AdamW(groups, lr=float(hp.learning_rate), weight_decay=0.0)
    bs, accum = int(hp.batch_size), int(hp.gradient_accumulation_steps)
    n_train = len(enc_train.examples)
    micro_per_epoch = math.ceil(n_train / bs)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = int(hp.max_steps or steps_per_epoch * int(hp.n_epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(hp, total_steps))
    objective = _make_objective(hp, total_steps)
    metric_name, metric_mode = primary_metric(task, problem_type)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # --- run dir ----------------------------------------------------------------------
    ckpt_root = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    resolved = config.to_dict()
    resolved["task"] = task
    resolved["hyperparameters"] = hp.to_dict()
    resolved["labels"] = labels
    state_info = {
        "config": resolved,
        "engine_version": ENGINE_VERSION,
        "model_path": str(model_path),
        "family": base.family,
        "n_train_examples": n_train,
        "n_val_examples": len(enc_val.examples),
        "total_steps": total_steps,
        "trainable_params": n_trainable,
        "warnings": report.warnings,
    }
    (run_dir / "config.json").write_text(json.dumps(state_info, indent=2, default=float), "utf-8")
    tokenizer.save_pretrained(str(run_dir / "tokenizer"))

    # --- resume -----------------------------------------------------------------------
    step, epoch, micro_idx, tokens = 0, 0, 0, 0
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = {}
    since_best = 0
    last_measured: float | None = None
    latest = ckpt.latest_checkpoint(ckpt_root) if resume else None
    if latest is not None:
        st = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer, scheduler=scheduler)
        step = int(st["step"])
        epoch = int(st["data_position"]["epoch"])
        micro_idx = int(st["data_position"]["micro_batch"])
        if st.get("objective") and hasattr(objective, "load_state_dict"):
            objective.load_state_dict(st["objective"])
        ex = st.get("extra", {})
        tokens = int(ex.get("tokens", 0))
        best_value, best_step = ex.get("best_value"), ex.get("best_step")
        best_metrics = ex.get("best_metrics", {})
        since_best = int(ex.get("since_best", 0))
        last_measured = ex.get("measured_sparsity")
        # metrics.jsonl may hold evaluations past the checkpoint (a crash after them)
        if metrics_path.is_file():
            keep = [
                ln
                for ln in metrics_path.read_text("utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("step", 0) <= step
            ]
            metrics_path.write_text("".join(x + "\n" for x in keep), "utf-8")
    elif resume is False or not ckpt.list_checkpoints(ckpt_root):
        if ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        if metrics_path.exists():
            metrics_path.unlink()

    def save_ckpt(reason: str) -> Path:
        d = ckpt.save_checkpoint(
            ckpt_root / f"step-{step}",
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            step=step,
            data_position={"epoch": epoch, "micro_batch": micro_idx},
            objective_state=objective.state_dict() if hasattr(objective, "state_dict") else {},
            extra={
                "tokens": tokens,
                "best_value": best_value,
                "best_step": best_step,
                "best_metrics": best_metrics,
                "since_best": since_best,
                "measured_sparsity": last_measured,
                "reason": reason,
            },
        )
        ckpt.prune_checkpoints(
            ckpt_root, int(hp.n_checkpoints), {best_step} if best_step is not None else set()
        )
        return d

    def run_eval() -> tuple[EvalRecord, bool]:
        nonlocal best_value, best_step, best_metrics, since_best, last_measured
        m = evaluate(
            model, enc_val.examples or enc_train.examples[:bs], collate, task, problem_type,
            bs, dev, autocast, hp.eval_max_batches,
        )  # fmt: skip
        sp = _measure(model)
        last_measured = sp["measured_sparsity"]
        if hasattr(objective, "update"):
            objective.update(last_measured, step)
        is_best = False
        early = False
        if _eligible(last_measured, hp):
            if is_better(m.get(metric_name), best_value, metric_mode):
                best_value, best_step, best_metrics = float(m[metric_name]), step, dict(m)
                since_best, is_best = 0, True
            else:
                since_best += 1
                if hp.early_stopping_patience and since_best >= hp.early_stopping_patience:
                    early = True
        rec = EvalRecord(
            step=step,
            total_steps=total_steps,
            metrics=m,
            measured_sparsity=last_measured,
            sparsity_by_type=sp["sparsity_by_type"],
            removable_params=sp["removable_params"],
            gated_params=sp["gated_params"],
            is_best=is_best,
        )
        row = {"step": step, "epoch": round(step / max(1, steps_per_epoch), 4), **m}
        row.update(
            measured_sparsity=last_measured,
            sparsity_by_type=sp["sparsity_by_type"],
            removable_params=sp["removable_params"],
            gated_params=sp["gated_params"],
            target_sparsity=float(hp.target_sparsity),
            is_best=is_best,
        )
        _append_jsonl(metrics_path, row)
        return rec, early

    # --- loop -------------------------------------------------------------------------
    status = "completed"
    t0 = time.perf_counter()
    start_step = step
    seen_examples = 0
    interval = int(hp.eval_interval)
    ck_interval = int(hp.checkpoint_interval)
    go_on = True
    try:
        while step < total_steps and go_on:
            order = _epoch_order(n_train, seed, epoch)
            while micro_idx < micro_per_epoch and step < total_steps:
                n_micro = min(accum, micro_per_epoch - micro_idx)
                optimizer.zero_grad(set_to_none=True)
                task_loss_v = 0.0
                step_examples = 0
                for _ in range(n_micro):
                    idx = order[micro_idx * bs : (micro_idx + 1) * bs]
                    batch = collate([enc_train.examples[i] for i in idx])
                    batch = {k: v.to(dev) for k, v in batch.items()}
                    with autocast():
                        out = model(**batch)
                    loss = out.loss.float() / n_micro
                    loss.backward()
                    task_loss_v += float(loss.detach())
                    step_examples += len(idx)
                    tokens += int(batch["attention_mask"].sum())
                    micro_idx += 1
                # lambda * term, already zero before sparsity_start_step
                sp_loss, sp_parts = objective.loss(model, step)
                if sp_loss.requires_grad:
                    sp_loss.backward()
                sp_v = float(sp_parts.get("sparsity_term", 0.0))
                weighted_sp = float(sp_loss.detach())
                if not math.isfinite(task_loss_v):
                    raise TrainingError(f"task loss became {task_loss_v} at step {step + 1}")
                if hp.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(
                        [p for p in model.parameters() if p.requires_grad], float(hp.max_grad_norm)
                    )
                optimizer.step()
                scheduler.step()
                step += 1
                seen_examples += step_examples
                elapsed = time.perf_counter() - t0
                done = step - start_step
                eta = elapsed / done * (total_steps - step) if done else None
                srec = StepRecord(
                    step=step,
                    total_steps=total_steps,
                    epoch=epoch + micro_idx / micro_per_epoch,
                    loss=task_loss_v + weighted_sp,
                    task_loss=task_loss_v,
                    sparsity_loss=sp_v,
                    lr=float(optimizer.param_groups[0]["lr"]),
                    examples_per_second=seen_examples / elapsed if elapsed > 0 else 0.0,
                    eta_seconds=eta,
                    measured_sparsity=last_measured,
                    tokens=tokens,
                )
                if cb.on_step(srec) is False:
                    go_on = False
                last = step >= total_steps
                if step % interval == 0 or last:
                    erec, early = run_eval()
                    if cb.on_eval(erec) is False:
                        go_on = False
                    if early:
                        status = "early_stopped"
                        go_on = False
                    if erec.is_best and step % ck_interval != 0 and not last and go_on:
                        d = save_ckpt("best")
                        if cb.on_checkpoint(CheckpointRecord(step, str(d), erec.metrics,
                                                             last_measured)) is False:  # fmt: skip
                            go_on = False
                if micro_idx >= micro_per_epoch:
                    epoch, micro_idx = epoch + 1, 0
                if step % ck_interval == 0 or last or not go_on:
                    d = save_ckpt("periodic" if go_on else "stop")
                    crec = CheckpointRecord(step, str(d), dict(best_metrics), last_measured)
                    if cb.on_checkpoint(crec) is False:
                        go_on = False
                if not go_on:
                    break
            else:
                if micro_idx >= micro_per_epoch:
                    epoch, micro_idx = epoch + 1, 0
        if not go_on and status != "early_stopped" and step < total_steps:
            status = "stopped"
    except FineGatesError:
        raise
    except torch.cuda.OutOfMemoryError as exc:  # pragma: no cover - GPU only
        raise TrainingError(f"out of GPU memory at step {step}; lower batch_size") from exc

    if status == "stopped":
        return TrainResult(
            status=status, steps=step, total_steps=total_steps, best_step=best_step,
            best_metrics=best_metrics, measured_sparsity=last_measured, final_dir=None,
            run_dir=str(run_dir), trained_tokens=tokens,
            target_reached=best_step is not None,
        )  # fmt: skip

    # --- final: the best eligible state -----------------------------------------------
    target_reached = best_step is not None
    if target_reached and best_step != step:
        ckpt.load_trainable(ckpt_root / f"step-{best_step}", model)
    model.eval()
    final_sp = _measure(model)
    info = {
        "format": "finegates-gated/1",
        "engine_version": ENGINE_VERSION,
        "base_model": config.model,
        "base_model_path": str(model_path),
        "family": base.family,
        "task": task,
        "problem_type": problem_type,
        "labels": labels,
        "kind": kind,
        "targets": hp.targets,
        "gated_modules": list(gated_modules(model)),
        "gate_config": asdict(gate_cfg),
        "trainable": hp.trainable,
        "head_modules": heads,
        "step": best_step if target_reached else step,
        "best_step": best_step,
        "target_reached": target_reached,
        "target_sparsity": float(hp.target_sparsity),
        "objective": hp.objective,
        "measured_sparsity": final_sp["measured_sparsity"],
        "sparsity_by_type": final_sp["sparsity_by_type"],
        "removable_params": final_sp["removable_params"],
        "gated_params": final_sp["gated_params"],
        "metrics": best_metrics,
        "max_length": max_len,
        "hyperparameters": hp.to_dict(),
    }
    model.to("cpu")
    final_dir = save_final(run_dir / "final", model, tokenizer, info)
    result = TrainResult(
        status=status,
        steps=step,
        total_steps=total_steps,
        best_step=best_step,
        best_metrics=best_metrics,
        measured_sparsity=final_sp["measured_sparsity"],
        final_dir=str(final_dir),
        run_dir=str(run_dir),
        trained_tokens=tokens,
        target_reached=target_reached,
    )
    result_path.write_text(json.dumps(result.to_dict(), indent=2, default=float), "utf-8")
    return result
