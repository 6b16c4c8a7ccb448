"""One typed, validated job configuration, shared by the CLI and the service.

Why stdlib dataclasses and hand-written checks instead of pydantic: core/ stays free of
service dependencies, and every rejection must name the field and the allowed range in
the same words whether it came from ``--hp`` on the command line or a JSON job body
(api/ maps ``ConfigError.field`` to the OpenAI-style ``param``).

"auto" is accepted where OpenAI accepts it (n_epochs, batch_size, learning_rate and the
other learning rates, plus eval/checkpoint intervals and max_length); ``resolve()`` turns
those into numbers once the dataset size and task are known.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

from core.errors import ConfigError

AUTO = "auto"
TASKS = ("classification", "causal_lm", "sparsify")
TRAINABLE_MODES = ("gates", "gates+lora", "gates+weights")
OBJECTIVES = ("calibrated", "paper")
SCHEDULERS = ("linear", "cosine", "constant")
PRECISIONS = ("auto", "fp32", "bf16")
# how the finished model is served (core.quantize): int8 on request, or "auto" when measured safe
SERVING_PRECISIONS = ("auto", "fp32", "int8")

# Defaults from method.md §2 (reference scripts) unless noted.
DEFAULT_GATE_LR = 1e-2  # method.md measures MiniLM at gate lr 1e-2; 1e-3 needs ~10x the steps
DEFAULT_HEAD_LR = (
    3e-3  # head (pooler + classifier) and biases; measured on MiniLM: 1e-3 barely moves in 40 steps
)
# LoRA inside the gates runs at scale alpha/r = 1; 2e-3 matches PEFT's usual alpha = 2r at
# 1e-3 (the benchmark's gates+lora rows use it).
DEFAULT_LORA_LR = 2e-3
# The calibrated objective ramps its target over the first 30% of steps: the gates close
# a few at a time while the task can still push back (bench: MiniLM, docs/benchmarks.md).
DEFAULT_CALIBRATED_RAMP = 0.3
DEFAULT_WEIGHT_LR = 2e-5
# Measured defaults (docs/benchmarks.md, issue 10): LoRA inside the gates wins on the task
# tasks at equal steps; "sparsify" keeps the model's own weights (gates only).
DEFAULT_TRAINABLE = {"classification": "gates+lora", "causal_lm": "gates+lora", "sparsify": "gates"}
# Weight of the KL to the dense teacher (method.md §2.7): language-model tasks distil from
# the model with its gates open; classification has no teacher that knows the task.
DEFAULT_DISTILLATION = {"classification": 0.0, "causal_lm": 0.5, "sparsify": 0.5}
IMPORTANCE_METHODS = ("flap", "wanda", "none")


def _is_auto(v: Any) -> bool:
    return isinstance(v, str) and v.strip().lower() == AUTO


def _num(
    name: str, v: Any, kind: type, lo: float | None, hi: float | None, *, auto=False, none=False
) -> Any:
    """Validate one number; returns the coerced value or "auto"/None where allowed."""
    rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
    extra = (' or "auto"' if auto else "") + (" or null" if none else "")
    if v is None:
        if none:
            return None
        raise ConfigError(name, f"must be a number in {rng}{extra}, got null")
    if _is_auto(v):
        if auto:
            return AUTO
        raise ConfigError(name, f'must be a number in {rng}, got "auto" (not allowed here)')
    if isinstance(v, bool):
        raise ConfigError(name, f"must be a number in {rng}{extra}, got {v!r}")
    if isinstance(v, str):
        try:
            v = float(v) if kind is float else int(v)
        except ValueError:
            raise ConfigError(name, f"must be a number in {rng}{extra}, got {v!r}") from None
    if kind is int:
        if isinstance(v, float):
            if not v.is_integer():
                raise ConfigError(name, f"must be an integer in {rng}{extra}, got {v!r}")
            v = int(v)
        if not isinstance(v, int):
            raise ConfigError(name, f"must be an integer in {rng}{extra}, got {v!r}")
    else:
        if not isinstance(v, int | float):
            raise ConfigError(name, f"must be a number in {rng}{extra}, got {v!r}")
        v = float(v)
        if not math.isfinite(v):
            raise ConfigError(name, f"must be a finite number in {rng}, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(name, f"must be in {rng}, got {v!r}")
    return v


def _choice(name: str, v: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ConfigError(name, f"must be one of {', '.join(repr(c) for c in choices)}, got {v!r}")
    return v


def _bool(name: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in {"true", "1", "yes", "on", "false", "0", "no", "off"}:
        return v.lower() in {"true", "1", "yes", "on"}
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ConfigError(name, f"must be true or false, got {v!r}")


@dataclass
class Hyperparameters:
    """Every knob of a job. Public names (first block) are fixed by the service API."""

    # --- public names (issue 4) ---
    n_epochs: int | str = AUTO
    max_steps: int | None = None  # overrides n_epochs when set
    batch_size: int | str = AUTO
    learning_rate: float | str = AUTO  # gates
    head_learning_rate: float | str = AUTO
    target_sparsity: float = 0.4  # fraction of gated weight params physically removed
    sparsity_weight: float = 50.0  # lambda
    sparsity_start_step: int = 0
    trainable: str = AUTO  # "auto": DEFAULT_TRAINABLE[task]
    lora_rank: int = 8
    max_length: int | str = AUTO
    eval_interval: int | str = AUTO  # optimizer steps between evaluations
    early_stopping_patience: int | None = None  # evaluations without improvement; None = off
    kurtosis: bool = False
    gate_noise_std: float = 0.1
    objective: str = "calibrated"
    # --- advanced ---
    gate_init_mean: float = 1.0
    gate_init_std: float = 0.1
    lora_learning_rate: float | str = AUTO
    weight_learning_rate: float | str = AUTO
    scheduler: str = "linear"
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    seed: int = 1948
    precision: str = "auto"
    targets: list[str] | str | None = None  # None = family default; "all-linear"; patterns
    checkpoint_interval: int | str = AUTO  # defaults to eval_interval
    n_checkpoints: int = 2  # periodic checkpoints kept (the best one is kept in addition)
    eval_max_batches: int | None = None
    # ramp the target from 0 over this share of steps; "auto": 0.3 (calibrated), 0 (paper)
    sparsity_warmup_ratio: float | str = AUTO
    # calibrated only: push only each gate vector's lowest (target + 0.05) share of gates
    sparsity_focus: bool = True
    sparsity_tolerance: float = 0.03  # a checkpoint may be "best" only within this of target
    max_grad_norm: float | None = 1.0
    # --- compression levers (method.md §1.5, §2.7-§2.10) ---
    head_gates: bool = True  # one gate per attention head on o_proj's columns
    importance_init: str = "flap"  # calibration scores that rank and start the gates
    importance_scale: float = 0.5  # how far below the open edge the weakest candidate starts
    calibration_batches: int = 8  # batches of the job's data in the calibration pass
    compensation: bool = False  # fold the mean of closed o/down inputs into the bias
    distillation: float | str = AUTO  # KL-to-dense-teacher weight; "auto": by task
    distill_temperature: float = 2.0
    recovery: bool = False  # once on target, freeze the gates; train the rest on
    serving_precision: str = "auto"  # "int8" | "fp32" | "auto" (int8 when within tolerance)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Hyperparameters:
        """Coerce and check every field in place; raises ConfigError naming the field."""
        s = self
        s.n_epochs = _num("n_epochs", s.n_epochs, int, 1, 1000, auto=True)
        s.max_steps = _num("max_steps", s.max_steps, int, 1, 10_000_000, none=True)
        s.batch_size = _num("batch_size", s.batch_size, int, 1, 4096, auto=True)
        s.learning_rate = _num("learning_rate", s.learning_rate, float, 1e-8, 10.0, auto=True)
        s.head_learning_rate = _num(
            "head_learning_rate", s.head_learning_rate, float, 0.0, 10.0, auto=True
        )
        s.target_sparsity = _num("target_sparsity", s.target_sparsity, float, 0.0, 0.95)
        s.sparsity_weight = _num("sparsity_weight", s.sparsity_weight, float, 0.0, 1e6)
        s.sparsity_start_step = _num(
            "sparsity_start_step", s.sparsity_start_step, int, 0, 10_000_000
        )
        if not _is_auto(s.trainable):
            s.trainable = _choice("trainable", s.trainable, (*TRAINABLE_MODES, AUTO))
        s.lora_rank = _num("lora_rank", s.lora_rank, int, 1, 1024)
        s.max_length = _num("max_length", s.max_length, int, 8, 131_072, auto=True)
        s.eval_interval = _num("eval_interval", s.eval_interval, int, 1, 10_000_000, auto=True)
        s.early_stopping_patience = _num(
            "early_stopping_patience", s.early_stopping_patience, int, 1, 10_000, none=True
        )
        s.kurtosis = _bool("kurtosis", s.kurtosis)
        s.gate_noise_std = _num("gate_noise_std", s.gate_noise_std, float, 0.0, 2.0)
        s.objective = _choice("objective", s.objective, OBJECTIVES)
        s.gate_init_mean = _num("gate_init_mean", s.gate_init_mean, float, -10.0, 10.0)
        s.gate_init_std = _num("gate_init_std", s.gate_init_std, float, 0.0, 5.0)
        s.lora_learning_rate = _num(
            "lora_learning_rate", s.lora_learning_rate, float, 0.0, 10.0, auto=True
        )
        s.weight_learning_rate = _num(
            "weight_learning_rate", s.weight_learning_rate, float, 0.0, 10.0, auto=True
        )
        s.scheduler = _choice("scheduler", s.scheduler, SCHEDULERS)
        s.warmup_ratio = _num("warmup_ratio", s.warmup_ratio, float, 0.0, 0.5)
        s.warmup_steps = _num("warmup_steps", s.warmup_steps, int, 0, 10_000_000, none=True)
        s.gradient_accumulation_steps = _num(
            "gradient_accumulation_steps", s.gradient_accumulation_steps, int, 1, 1024
        )
        s.weight_decay = _num("weight_decay", s.weight_decay, float, 0.0, 1.0)
        s.seed = _num("seed", s.seed, int, 0, 2**32 - 1)
        s.precision = _choice("precision", s.precision, PRECISIONS)
        s.targets = _targets(s.targets)
        s.checkpoint_interval = _num(
            "checkpoint_interval", s.checkpoint_interval, int, 1, 10_000_000, auto=True
        )
        s.n_checkpoints = _num("n_checkpoints", s.n_checkpoints, int, 1, 100)
        s.eval_max_batches = _num(
            "eval_max_batches", s.eval_max_batches, int, 1, 10_000_000, none=True
        )
        s.sparsity_warmup_ratio = _num(
            "sparsity_warmup_ratio", s.sparsity_warmup_ratio, float, 0.0, 1.0, auto=True
        )
        s.sparsity_focus = _bool("sparsity_focus", s.sparsity_focus)
        s.sparsity_tolerance = _num("sparsity_tolerance", s.sparsity_tolerance, float, 0.0, 1.0)
        s.max_grad_norm = _num("max_grad_norm", s.max_grad_norm, float, 0.0, 1e6, none=True)
        s.head_gates = _bool("head_gates", s.head_gates)
        s.importance_init = _choice("importance_init", s.importance_init, IMPORTANCE_METHODS)
        s.importance_scale = _num("importance_scale", s.importance_scale, float, 0.0, 1.5)
        s.calibration_batches = _num("calibration_batches", s.calibration_batches, int, 0, 1000)
        s.compensation = _bool("compensation", s.compensation)
        s.distillation = _num("distillation", s.distillation, float, 0.0, 100.0, auto=True)
        s.distill_temperature = _num(
            "distill_temperature", s.distill_temperature, float, 0.1, 100.0
        )
        s.recovery = _bool("recovery", s.recovery)
        if (s.importance_init != "none" or s.compensation) and s.calibration_batches == 0:
            raise ConfigError(
                "calibration_batches",
                "must be >= 1 when importance_init is not 'none' or compensation is on",
            )
        s.serving_precision = _choice("serving_precision", s.serving_precision, SERVING_PRECISIONS)
        return s

    # ------------------------------------------------------------------ (de)serialise
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Hyperparameters:
        """Build from a JSON-ish dict; unknown names are rejected with the valid list."""
        if d is None:
            d = {}
        if not isinstance(d, dict):
            raise ConfigError("hyperparameters", f"must be an object, got {type(d).__name__}")
        d = dict(d)
        valid = cls.field_names()
        for k in d:
            if k not in valid:
                raise ConfigError(
                    str(k), f"unknown hyperparameter; valid names are: {', '.join(valid)}"
                )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def is_resolved(self) -> bool:
        """True when no numeric field is still "auto" (the precisions' "auto" is a mode, not a
        number)."""
        modes = ("precision", "serving_precision")
        return not any(_is_auto(v) for k, v in asdict(self).items() if k not in modes)

    def resolve(self, n_train: int, task: str, family: str | None = None) -> Hyperparameters:
        """Replace every "auto" with a number chosen from dataset size and task.

        Why these numbers: gates start saturated (method.md §2), so for the first few
        hundred steps only the sparsity term moves them; "auto" epochs therefore aim
        for at least ~600 optimizer steps on small datasets, within [1, 20] epochs.
        """
        h = replace(self)
        lm = task in ("causal_lm", "sparsify")
        if _is_auto(h.trainable):
            h.trainable = DEFAULT_TRAINABLE.get(task, "gates")
        if h.distillation == AUTO:
            h.distillation = DEFAULT_DISTILLATION.get(task, 0.0)
        if h.batch_size == AUTO:
            h.batch_size = 8 if lm else 32
        if h.max_length == AUTO:
            h.max_length = 512 if lm else 128
        if h.head_learning_rate == AUTO:
            h.head_learning_rate = DEFAULT_HEAD_LR
        if h.lora_learning_rate == AUTO:
            h.lora_learning_rate = DEFAULT_LORA_LR
        if h.weight_learning_rate == AUTO:
            h.weight_learning_rate = DEFAULT_WEIGHT_LR
        accum = h.gradient_accumulation_steps
        # "auto" batch_size/n_epochs were replaced by ints just above (validated values are
        # int or "auto")
        steps_per_epoch = max(1, math.ceil(max(1, n_train) / (cast(int, h.batch_size) * accum)))
        if h.n_epochs == AUTO:
            h.n_epochs = int(min(20, max(1, math.ceil(600 / steps_per_epoch))))
        total = h.max_steps or steps_per_epoch * cast(int, h.n_epochs)
        if h.learning_rate == AUTO:
            # A gate travels ~1.6 logit units from init (theta~1) to closed (theta<-0.55)
            # and Adam moves it about lr per step, so short jobs need a larger gate lr to
            # reach the target in the first ~40% of training. Capped at 0.05.
            h.learning_rate = float(max(DEFAULT_GATE_LR, min(0.05, 5.0 / max(1, total))))
        if h.sparsity_warmup_ratio == AUTO:
            h.sparsity_warmup_ratio = (
                DEFAULT_CALIBRATED_RAMP if h.objective == "calibrated" else 0.0
            )
        if h.eval_interval == AUTO:
            h.eval_interval = int(max(1, min(500, math.ceil(total / 10))))
        if h.checkpoint_interval == AUTO:
            h.checkpoint_interval = h.eval_interval
        return h.validate()


def _targets(v: Any) -> list[str] | str | None:
    if v is None:
        return None
    if isinstance(v, str):
        if v == "all-linear":
            return v
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts:
            raise ConfigError("targets", 'must be "all-linear" or a list of module-name patterns')
        return parts
    if isinstance(v, list | tuple) and v and all(isinstance(p, str) and p for p in v):
        return list(v)
    raise ConfigError(
        "targets", f'must be "all-linear" or a non-empty list of module-name patterns, got {v!r}'
    )


@dataclass
class JobConfig:
    """A whole job: base model, task, data, columns and hyperparameters."""

    model: str
    training_file: str
    task: str | None = None  # None = detected from the training file
    validation_file: str | None = None
    text_column: str = "text"
    text_pair_column: str = "text_pair"
    label_column: str = "label"
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    seed: int | None = None  # job-level seed (OpenAI shape); overrides hyperparameters.seed
    validation_split: float = 0.1  # carved out of training data when no validation_file
    max_validation_rows: int = 1000
    labels: list[str] | None = None  # class order; None = sorted labels found in the data
    data_dir: str | None = None  # where the catalog caches models; None = run_dir/.. default
    allow_hub: bool = False
    # False for ids a service tenant sent: then a model id never names a local folder
    allow_paths: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> JobConfig:
        if not isinstance(self.model, str) or not self.model.strip():
            raise ConfigError("model", "must be a non-empty model id")
        if not isinstance(self.training_file, str | Path) or not str(self.training_file):
            raise ConfigError("training_file", "must be a path")
        self.training_file = str(self.training_file)
        if self.validation_file is not None:
            self.validation_file = str(self.validation_file)
        if self.task is not None:
            self.task = _choice("task", self.task, TASKS)
        for name in ("text_column", "text_pair_column", "label_column"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v:
                raise ConfigError(name, f"must be a non-empty column name, got {v!r}")
        if isinstance(self.hyperparameters, dict):
            self.hyperparameters = Hyperparameters.from_dict(self.hyperparameters)
        if not isinstance(self.hyperparameters, Hyperparameters):
            raise ConfigError("hyperparameters", "must be an object")
        self.seed = _num("seed", self.seed, int, 0, 2**32 - 1, none=True)
        self.validation_split = _num("validation_split", self.validation_split, float, 0.0, 0.5)
        self.max_validation_rows = _num(
            "max_validation_rows", self.max_validation_rows, int, 1, 10_000_000
        )
        if self.labels is not None:
            if not isinstance(self.labels, list) or not self.labels:
                raise ConfigError("labels", "must be a non-empty list of class names")
            self.labels = [str(x) for x in self.labels]
            if len(set(self.labels)) != len(self.labels):
                raise ConfigError("labels", "must not repeat a class name")
        self.allow_hub = _bool("allow_hub", self.allow_hub)
        self.allow_paths = _bool("allow_paths", self.allow_paths)
        return self

    @property
    def effective_seed(self) -> int:
        return self.seed if self.seed is not None else int(self.hyperparameters.seed)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hyperparameters"] = self.hyperparameters.to_dict()
        return d

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JobConfig:
        if not isinstance(d, dict):
            raise ConfigError("config", "must be a JSON object")
        valid = cls.field_names()
        for k in d:
            if k not in valid:
                raise ConfigError(str(k), f"unknown job field; valid names are: {', '.join(valid)}")
        for req in ("model", "training_file"):
            if req not in d:
                raise ConfigError(req, "is required")
        d = dict(d)
        d["hyperparameters"] = Hyperparameters.from_dict(d.get("hyperparameters") or {})
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> JobConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("config", f"is not valid JSON: {exc}") from exc
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: Path | str) -> JobConfig:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("config", f"cannot read {path}: {exc}") from exc
        return cls.from_json(text)

    def save(self, path: Path | str) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")
