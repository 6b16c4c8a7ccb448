"""The run directory: what ``core.train.train`` writes and what packaging reads back.

It is a format of its own, shared by the trainer, the checkpoints, the packaging
pipeline and the worker, so its names and its version live here and nowhere else.

Layout (run format_version 1)::

    format.json               {"format": "finegates-run", "format_version": 1}
    config.json               RunConfig: the resolved job config and data/model facts
    metrics.jsonl             one evaluation per line (step, task metrics, sparsity)
    result.json               the TrainResult of a run that reached its end
    tokenizer/                tokenizer.save_pretrained
    checkpoints/step-N/       trainable state for exact resume (core.checkpoint):
                              trainable/optimizer/rng .safetensors + state.json
    final/                    the best eligible gated state (see core.train):
                              gated_state.safetensors, the HF config.json,
                              gated_model.json (GatedInfo), tokenizer/

Why a version file: a run directory outlives the process that wrote it (a worker
resumes it after a restart, a retry prunes it again, an upgraded engine may meet one
from an older or a newer release). A reader refuses an unknown or newer version with
``RunDirError`` instead of misreading it. Directories written before the version file
existed have the same layout and are read as version 1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypedDict, cast

import torch
from torch import nn

from core import ENGINE_VERSION
from core.errors import RunDirError, TrainingError
from core.gates import GateConfig, gated_modules, inject_gates
from core.modeling import load_tokenizer

RUN_FORMAT = "finegates-run"
RUN_FORMAT_VERSION = 1
SUPPORTED_RUN_FORMATS = frozenset({1})

FORMAT_FILE = "format.json"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
RESULT = "result.json"
TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
FINAL = "final"

# final/
FINAL_STATE = "gated_state.safetensors"
COMPENSATION = "compensation.safetensors"  # calibration means of compensated layers
FINAL_INFO = "gated_model.json"
FINAL_FORMAT = "finegates-gated/1"

# checkpoints/step-N/
STEP_DIR = re.compile(r"^step-(\d+)$")
CKPT_TRAINABLE = "trainable.safetensors"
CKPT_OPTIMIZER = "optimizer.safetensors"
CKPT_RNG = "rng.safetensors"
CKPT_STATE = "state.json"
CHECKPOINT_FORMAT = "finegates-checkpoint/1"

__all__ = [
    "RUN_FORMAT_VERSION",
    "RunDir",
    "RunConfig",
    "GatedInfo",
    "TrainResult",
    "load_gated_run",
]


class RunConfig(TypedDict):
    """config.json: what the run was started with, after every "auto" was resolved."""

    config: dict[str, Any]  # JobConfig.to_dict() with task, hyperparameters, labels
    engine_version: str
    model_path: str
    family: str
    n_train_examples: int
    n_val_examples: int
    total_steps: int
    trainable_params: int
    warnings: list[str]
    calibration: dict[str, Any]  # the calibration pass's summary (core.train_setup.calibrate)


class GatedInfo(TypedDict, total=False):
    """final/gated_model.json: enough to rebuild the gated model and to package it."""

    format: str
    engine_version: str
    base_model: str
    base_model_path: str
    family: str
    task: str
    problem_type: str | None
    labels: list[str] | None
    kind: str
    targets: Any
    gated_modules: list[str]
    gate_config: dict[str, Any]
    trainable: str
    head_modules: list[str]
    step: int
    best_step: int | None
    target_reached: bool
    target_sparsity: float
    objective: str
    measured_sparsity: float
    sparsity_by_type: dict[str, float]
    removable_params: int
    gated_params: int
    metrics: dict[str, float]
    max_length: int
    hyperparameters: dict[str, Any]
    column_groups: dict[str, int]  # head gates: o_proj name -> columns per gate
    compensated: list[str]  # layers whose calibration means are in COMPENSATION


@dataclass
class TrainResult:
    """What ``train`` returns; result.json holds it for a run that reached its end."""

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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = RESULT) -> TrainResult:
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise RunDirError(f"{where}: not a training result ({exc})") from None


def _write_json(path: Path, obj: Any) -> None:
    """Write through a temporary sibling so a crash never leaves half a JSON file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float), "utf-8")
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunDirError(f"{path}: not valid JSON ({exc})") from None


class RunDir:
    """One run directory. Every reader checks the format version first."""

    __slots__ = ("root",)

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # --- paths -------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.root / METRICS

    @property
    def result_path(self) -> Path:
        return self.root / RESULT

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / TOKENIZER

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def final_dir(self) -> Path:
        return self.root / FINAL

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / f"step-{int(step)}"

    # --- version -----------------------------------------------------------------------
    def format_version(self) -> int:
        """The run format version; raises RunDirError when this engine cannot read it."""
        path = self.root / FORMAT_FILE
        if not path.is_file():
            return RUN_FORMAT_VERSION  # written before the version file existed
        data = _read_json(path)
        version = data.get("format_version") if isinstance(data, dict) else None
        if (
            not isinstance(data, dict)
            or data.get("format") != RUN_FORMAT
            or not isinstance(version, int)
        ):
            raise RunDirError(f"{path}: not a FineGates run format file")
        if version not in SUPPORTED_RUN_FORMATS:
            raise RunDirError(
                f"{self.root}: run directory format_version {version} is not supported by "
                f"this engine ({ENGINE_VERSION} reads {sorted(SUPPORTED_RUN_FORMATS)}); "
                "it was written by a newer FineGates"
            )
        return version

    def prepare(self) -> None:
        """Create the directory (or check an existing one) and record its version."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.format_version()
        path = self.root / FORMAT_FILE
        if not path.is_file():
            _write_json(path, {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION})

    # --- config.json -------------------------------------------------------------------
    def write_config(self, config: RunConfig) -> None:
        _write_json(self.config_path, config)

    def read_config(self) -> RunConfig | None:
        self.format_version()
        if not self.config_path.is_file():
            return None
        data = _read_json(self.config_path)
        if not isinstance(data, dict):
            raise RunDirError(f"{self.config_path}: must be a JSON object")
        return cast(RunConfig, data)

    def save_tokenizer(self, tokenizer: Any) -> None:
        tokenizer.save_pretrained(str(self.tokenizer_dir))

    # --- metrics.jsonl -----------------------------------------------------------------
    def append_metrics(self, row: Mapping[str, Any]) -> None:
        """One evaluation row; it must carry its optimizer ``step``."""
        if not isinstance(row.get("step"), int):
            raise TrainingError("a metrics row needs an integer 'step'")
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(dict(row), default=float) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        self.format_version()
        if not self.metrics_path.is_file():
            return []
        rows = []
        for n, line in enumerate(self.metrics_path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise RunDirError(
                    f"{self.metrics_path}, line {n}: not valid JSON ({exc})"
                ) from None
        return rows

    def truncate_metrics(self, last_step: int) -> None:
        """Drop evaluations past ``last_step``: a crash after an evaluation but before the
        next checkpoint leaves rows that the resumed run will write again."""
        if not self.metrics_path.is_file():
            return
        keep = [
            ln
            for ln in self.metrics_path.read_text("utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("step", 0) <= last_step
        ]
        self.metrics_path.write_text("".join(x + "\n" for x in keep), "utf-8")

    def reset_progress(self) -> None:
        """A fresh start: no checkpoints, no metrics."""
        if self.checkpoints.exists():
            shutil.rmtree(self.checkpoints)
        self.metrics_path.unlink(missing_ok=True)

    # --- result.json -------------------------------------------------------------------
    def write_result(self, result: TrainResult) -> None:
        _write_json(self.result_path, result.to_dict())

    def read_result(self) -> TrainResult | None:
        self.format_version()
        if not self.result_path.is_file():
            return None
        data = _read_json(self.result_path)
        if not isinstance(data, dict):
            raise RunDirError(f"{self.result_path}: must be a JSON object")
        return TrainResult.from_dict(data, str(self.result_path))

    def forget_result(self) -> None:
        """Remove result.json and final/ (a run started over)."""
        self.result_path.unlink(missing_ok=True)
        shutil.rmtree(self.final_dir, ignore_errors=True)

    # --- final/ ------------------------------------------------------------------------
    def has_final(self) -> bool:
        return (self.final_dir / FINAL_INFO).is_file()

    def write_final(self, model: nn.Module, tokenizer: Any, info: GatedInfo) -> Path:
        """All weights needed to rebuild the gated model (base + gates + head) + its info,
        written aside and renamed into place."""
        from safetensors.torch import save_model

        final_dir = self.final_dir
        tmp = final_dir.parent / f".{final_dir.name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / FINAL_STATE))
        from core.importance import compensation_state

        comp = compensation_state(model)
        if comp:
            from safetensors.torch import save_file

            save_file(comp, str(tmp / COMPENSATION))
        cast(Any, model.config).save_pretrained(str(tmp))  # an HF PretrainedConfig
        (tmp / FINAL_INFO).write_text(json.dumps(info, indent=2, default=float), "utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / TOKENIZER))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
        return final_dir

    def read_final_info(self) -> tuple[Path, GatedInfo]:
        """(the folder holding the final state, its info). A folder that itself holds
        gated_model.json (a copied final/) is accepted as well."""
        self.format_version()
        final = self.final_dir if self.has_final() else self.root
        path = final / FINAL_INFO
        if not path.is_file():
            raise TrainingError(f"{self.root}: no final gated state ({FINAL_INFO} missing)")
        info = _read_json(path)
        if not isinstance(info, dict):
            raise RunDirError(f"{path}: must be a JSON object")
        fmt = info.get("format", FINAL_FORMAT)
        if fmt != FINAL_FORMAT:
            raise RunDirError(f"{path}: unknown gated state format {fmt!r} (reads {FINAL_FORMAT})")
        for key in ("task", "gated_modules", "gate_config"):
            if key not in info:
                raise RunDirError(f"{path}: lacks required field '{key}'")
        return final, cast(GatedInfo, info)


def load_gated_run(run_dir: Path | str) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Rebuild the gated model from ``run_dir/final`` (eval mode, fp32) for pruning/serving.

    The skeleton comes from the saved HF config (no code is run), the gates are injected
    at the exact module names recorded, then ALL tensors load strictly from safetensors.
    """
    from safetensors.torch import load_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    rd = RunDir(run_dir)
    final, info = rd.read_final_info()
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
    gms = gated_modules(model)
    for name, group in (info.get("column_groups") or {}).items():
        if name not in gms:
            raise RunDirError(f"{final}: column_groups names {name!r}, which is not gated")
        gms[name].col_group = int(group)  # the saved logits are already equal per group
    if info.get("compensated"):
        from safetensors.torch import load_file

        from core.importance import load_compensation

        path = final / COMPENSATION
        if not path.is_file():
            raise RunDirError(f"{final}: compensated layers listed but {COMPENSATION} missing")
        means = load_file(str(path))
        if sorted(means) != sorted(info["compensated"]):
            raise RunDirError(f"{final}: {COMPENSATION} does not match 'compensated'")
        load_compensation(model, means)
    tok_dir = final / TOKENIZER if (final / TOKENIZER).is_dir() else rd.tokenizer_dir
    tokenizer = load_tokenizer(tok_dir, info.get("family"))
    model.eval()
    return model, tokenizer, dict(info)
