"""Everything ``core.train.train`` does before its first step, one function per stage.

The stages are: the records (``prepare_data``), the gated model (``build_model``), the
encoded examples (``encode_data``), and the device, optimizer, LR schedule and sparsity
objective (``build_schedule``). ``train`` calls them in this order, and the order of
their RNG draws is part of exact resume: change it and a resumed run no longer equals a
straight one.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from core.catalog import resolve_model
from core.config import Hyperparameters, JobConfig
from core.data import LoadedData, load_records, split_validation
from core.errors import ConfigError, DataError
from core.gates import GateConfig, gated_modules, inject_gates, set_input_recording, tie_columns
from core.metrics import primary_metric
from core.modeling import LoadedBase, load_base
from core.tokenize import Collator, Encoded, encode_classification, encode_lm
from core.trainable import configure_trainable, default_head_modules, param_groups


def default_data_dir() -> Path:
    return Path(os.environ.get("FINEGATES_DATA_DIR", Path.home() / ".cache" / "finegates"))


def make_objective(hp: Hyperparameters, total_steps: int) -> Any:
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


# ----------------------------------------------------------------------------- helpers
def pick_device(device: str | None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_factory(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return lambda: torch.autocast(device_type=device.type, enabled=False)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- data
@dataclass
class JobData:
    """The records of one job, checked against its config."""

    task: str
    kind: str
    problem_type: str | None
    labels: list[str] | None
    train: list[dict]
    val: list[dict]
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


def prepare_data(config: JobConfig) -> JobData:
    task, train_data, train_recs, val_recs = _load_data(config)
    report = train_data.report
    problem_type = report.problem_type if task == "classification" else None
    labels = config.labels or report.labels
    if task == "classification" and problem_type != "regression":
        assert labels is not None
        unknown = sorted({r["label"] for r in train_recs + val_recs} - set(labels))
        if unknown:
            raise ConfigError("labels", f"data has labels not in the configured list: {unknown}")
    if task == "sparsify" and config.hyperparameters.trainable not in ("gates", "auto"):
        raise ConfigError("trainable", "task 'sparsify' trains gates only; use 'gates'")
    return JobData(
        task=task,
        kind=report.kind,
        problem_type=problem_type,
        labels=labels,
        train=train_recs,
        val=val_recs,
        warnings=report.warnings,
    )


# ----------------------------------------------------------------------------- model + gates
@dataclass
class ModelSetup:
    """The gated model, ready to train."""

    model_path: Path
    base: LoadedBase
    model: nn.Module
    tokenizer: Any
    gate_cfg: GateConfig
    heads: list[str]
    hp: Hyperparameters  # resolved against the record count (gate settings, max_length)


def build_model(config: JobConfig, data: JobData, seed: int) -> ModelSetup:
    data_dir = Path(config.data_dir) if config.data_dir else default_data_dir()
    model_path = resolve_model(
        config.model, data_dir, allow_hub=config.allow_hub, allow_paths=config.allow_paths
    )
    hp = config.hyperparameters.resolve(len(data.train), data.task)
    seed_everything(seed)
    base = load_base(model_path, data.task, labels=data.labels, problem_type=data.problem_type)
    model = base.model
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
    if hp.head_gates:
        group_head_gates(model)
    return ModelSetup(model_path, base, model, base.tokenizer, gate_cfg, heads, hp)


def group_head_gates(model: nn.Module) -> dict[str, int]:
    """Tie o_proj's column gates per KV group (method.md §1.5); returns name -> group.

    Under MHA a KV group is one head; under GQA it is the group_size query heads that
    share a key/value head, the smallest attention unit the plan can remove.

    Why: a head is removed only when all of its head_dim value/output lines close. With one
    gate per column that needs head_dim independent closures, and the gradient of "the
    whole head is closed" is a product of head_dim terms that vanishes while they are open,
    so whole heads (the only removals that save attention time on CPU) almost never happen.
    One gate per head makes closing a head one decision.
    """
    from core.structure import describe

    S = describe(model)
    gms = gated_modules(model)
    out = {}
    for ls in S.layers:
        gm = gms.get(ls.o)
        if gm is not None:
            tie_columns(gm, S.group_size * S.head_dim)
            out[ls.o] = S.group_size * S.head_dim
    return out


def calibration_batches(
    examples: list[dict], collate: Collator, batch_size: int, n_batches: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    """The first n_batches batches of the training examples in file order (deterministic,
    so a resumed run recomputes exactly the same statistics)."""
    out = []
    for b in range(n_batches):
        chunk = examples[b * batch_size : (b + 1) * batch_size]
        if not chunk:
            break
        out.append({k: v.to(device) for k, v in collate(chunk).items()})
    return out


def calibrate(model: nn.Module, hp: Hyperparameters, tokens: Tokens, device: torch.device) -> dict:
    """The calibration pass before the first step (method.md §2.7): input statistics of
    every gated Linear on a few batches, then the importance init of the gates and/or the
    compensation means. Returns a summary for the run config. Runs before a resume's
    restore, which overwrites the gate logits with the checkpoint's."""
    from core.importance import (
        collect_input_stats,
        init_gates_from_scores,
        set_compensation,
        unit_scores,
    )
    from core.structure import describe

    if hp.calibration_batches == 0 or (hp.importance_init == "none" and not hp.compensation):
        return {"calibrated": False}
    S = describe(model)
    names = [n for ls in S.layers for n in (ls.o, ls.ffn_out)]
    batches = calibration_batches(
        tokens.train.examples, tokens.collate, int(hp.batch_size), int(hp.calibration_batches),
        device,
    )  # fmt: skip
    stats = collect_input_stats(model, batches, names)
    summary: dict[str, Any] = {
        "calibrated": True,
        "calibration_tokens": max((st.count for st in stats.values()), default=0),
    }
    if hp.importance_init != "none":
        scores = unit_scores(model, S, stats, str(hp.importance_init))
        share = min(1.0, float(hp.target_sparsity) + 0.05)
        summary["candidates"] = init_gates_from_scores(
            model, S, scores, share, float(hp.importance_scale)
        )
    if hp.compensation:
        summary["compensated"] = set_compensation(model, S, stats)
    return summary


# ----------------------------------------------------------------------------- tokens
@dataclass
class Tokens:
    train: Encoded
    val: Encoded
    collate: Collator
    max_len: int
    hp: Hyperparameters  # every "auto" resolved against the encoded size


def _encode(
    task: str, kind: str, records: list[dict], tokenizer: Any, max_length: int,
    label2id: dict[str, int] | None,
) -> Encoded:  # fmt: skip
    if task == "classification":
        return encode_classification(records, tokenizer, max_length, label2id)
    return encode_lm(records, tokenizer, max_length, kind)


def encode_data(config: JobConfig, data: JobData, setup: ModelSetup) -> Tokens:
    task = data.task
    label2id = (
        {lab: i for i, lab in enumerate(cast(list[str], data.labels))}  # checked in prepare_data
        if task == "classification" and data.problem_type != "regression"
        else None
    )
    max_len = int(setup.hp.max_length)
    model_max = getattr(setup.model.config, "max_position_embeddings", None)
    if model_max:
        max_len = min(max_len, int(model_max))
    enc_train = _encode(task, data.kind, data.train, setup.tokenizer, max_len, label2id)
    enc_val = _encode(task, data.kind, data.val, setup.tokenizer, max_len, label2id)
    if not enc_train.examples:
        raise DataError(
            f"no training example has tokens to learn from after truncation (max_length {max_len})",
            file=config.training_file,
        )
    collate = Collator(setup.tokenizer.pad_token_id or 0, lm=task != "classification")
    # "auto" values that depend on the encoded size (text is chunked) are resolved here.
    hp = config.hyperparameters.resolve(len(enc_train.examples), task)
    hp.max_length = max_len
    return Tokens(enc_train, enc_val, collate, max_len, hp)


# ----------------------------------------------------------------------------- optimizer
@dataclass
class Schedule:
    """Device, optimizer, LR schedule, sparsity objective and the step arithmetic."""

    device: torch.device
    autocast: Callable[[], Any]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    objective: Any
    batch_size: int
    accum: int
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    metric_name: str
    metric_mode: str


def build_schedule(
    model: nn.Module, hp: Hyperparameters, n_train: int, task: str, problem_type: str | None,
    device: str | None,
) -> Schedule:  # fmt: skip
    dev = pick_device(device)
    model.to(dev)
    model.train()
    autocast = autocast_factory(dev, hp.precision)
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
    micro_per_epoch = math.ceil(n_train / bs)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total_steps = int(hp.max_steps or steps_per_epoch * int(hp.n_epochs))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(hp, total_steps))
    objective = make_objective(hp, total_steps)
    metric_name, metric_mode = primary_metric(task, problem_type)
    return Schedule(
        dev, autocast, optimizer, scheduler, objective, bs, accum, micro_per_epoch,
        steps_per_epoch, total_steps, metric_name, metric_mode,
    )  # fmt: skip
