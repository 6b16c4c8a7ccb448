"""int8 on top of pruning: the artifact's int8 file, the in-process int8 model, and the
accuracy check that decides whether serving may use int8 on its own.

Two int8 forms, both dynamic quantization of every Linear (weights int8 per tensor,
activations quantized per call from their observed range, so no calibration data):

- ``model.int8.onnx``: ONNX Runtime's ``quantize_dynamic`` of the artifact's model.onnx
  (QInt8 weights). It is written into the artifact and hashed in its manifest like every
  other file, so ONNX tooling and ``GET /v1/models/{id}/artifact?format=onnx-int8`` get
  the int8 model as it was measured.
- ``torch_int8(model)``: PyTorch's dynamic quantization of the pruned model's Linears,
  built at load time from the fp32 weights (deterministic: the same weights give the same
  int8 model, so it needs no file of its own). On this CPU it measured faster than the
  ONNX Runtime int8 session (MiniLM at 40% removed, 32x128: 0.33x vs 0.43x of dense fp32
  torch), so serving uses it unless an artifact's report measured the ONNX file faster.

``serving_precision`` (a job hyperparameter, recorded in the manifest's training config):
"int8" serves int8; "fp32" serves fp32; "auto" (the default) serves int8 only when the
report measured the int8 model's validation metric within ``INT8_TOLERANCE`` of the
pruned fp32 model's on the job's validation set.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.config import SERVING_PRECISIONS

log = logging.getLogger(__name__)

INT8_ONNX = "model.int8.onnx"
PRECISIONS = SERVING_PRECISIONS
INT8_TOLERANCE = 0.005  # 0.5 accuracy point (absolute, on a 0..1 metric)

__all__ = [
    "INT8_ONNX",
    "INT8_TOLERANCE",
    "PRECISIONS",
    "quantize_onnx",
    "torch_int8",
    "validation_metrics",
    "int8_verdict",
    "choose_precision",
]


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """ONNX Runtime dynamic int8 of ``src`` (an fp32 model.onnx) written to ``dst``."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    root = logging.getLogger()  # onnxruntime logs a pre-processing hint on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return dst


def torch_int8(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose Linears (all with in and out width > 0) run int8.

    Zero-width Linears (a layer that lost every head) stay as they are: the quantized
    kernel does not take an empty weight, and they cost nothing anyway."""
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

    spec = {
        name: default_dynamic_qconfig
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.in_features > 0 and m.out_features > 0
    }
    q = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice for eager quantization
        q = quantize_dynamic(q, spec, dtype=torch.qint8)
    return q.eval()  # a tied lm_head is quantized as its own copy; the embedding stays fp32


# ----------------------------------------------------------------------------- accuracy
Logits = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def validation_metrics(
    runners: dict[str, Logits],
    examples: Sequence[dict[str, Any]],
    pad_token_id: int,
    regression: bool = False,
    batch_size: int = 32,
) -> dict[str, float]:
    """Accuracy (classification) or MSE (regression) of each runner on ``examples``
    (encoded by core.tokenize.encode_classification: input_ids, token_type_ids, labels).

    Every runner sees the same padded batches; the key is the runner's name."""
    from core.tokenize import Collator

    collate = Collator(pad_token_id, lm=False)
    correct = dict.fromkeys(runners, 0.0)
    n = 0
    for s in range(0, len(examples), batch_size):
        batch = collate(list(examples[s : s + batch_size]))
        labels = batch.pop("labels")
        n += len(labels)
        for name, run in runners.items():
            with torch.inference_mode():
                logits = run(batch).float()
            if regression:
                correct[name] += float(((logits.view(-1) - labels.float()) ** 2).sum())
            else:
                correct[name] += float((logits.argmax(-1) == labels).sum())
    return {k: v / max(1, n) for k, v in correct.items()}


def int8_verdict(
    fp32: float, int8: float, n: int, regression: bool = False, tolerance: float = INT8_TOLERANCE
) -> dict[str, Any]:
    """The report's ``int8.validation`` block: both metrics, their gap, the rule."""
    metric = "mse" if regression else "accuracy"
    gap = (int8 - fp32) if regression else (fp32 - int8)  # > 0: int8 is worse
    # regression: the tolerance is relative to the fp32 error (MSE has no fixed scale)
    limit = tolerance * max(abs(fp32), 1e-12) if regression else tolerance
    return {
        "metric": metric,
        "examples": int(n),
        "fp32": fp32,
        "int8": int8,
        "int8_loss": gap,
        "tolerance": tolerance,
        "within_tolerance": bool(gap <= limit),
    }


def choose_precision(requested: str | None, report: dict[str, Any] | None) -> tuple[str, str]:
    """(precision, why) for serving: the job's ``serving_precision`` wins, else int8 only
    when the report shows its validation metric within tolerance of fp32."""
    req = (requested or "auto").lower()
    if req in ("fp32", "int8"):
        return req, f"serving_precision {req!r} requested"
    block = (report or {}).get("int8") or {}
    val = block.get("validation") if isinstance(block, dict) else None
    if isinstance(val, dict) and val.get("within_tolerance") is True:
        return "int8", (
            f"int8 {val.get('metric')} within {val.get('tolerance')} of fp32 on "
            f"{val.get('examples')} validation examples"
        )
    if isinstance(val, dict):
        return "fp32", "int8 validation metric outside the tolerance"
    return "fp32", "no int8 validation measurement in the report"


def validation_set(
    run_dir: str | Path, tokenizer: Any, fields: dict[str, Any], max_rows: int = 512
) -> dict[str, Any] | None:
    """The job's validation examples, encoded as training encoded them, for the int8
    accuracy check; None for generation tasks, or when the run's data cannot be read
    again (a run directory moved without its data files)."""
    if (fields.get("task") or "") != "classification":
        return None
    try:
        return _validation_set(run_dir, tokenizer, fields, max_rows)
    except Exception as exc:  # noqa: BLE001 - optional: the report says it is missing
        log.warning("int8 check: the run's validation data could not be read again (%s)", exc)
        return None


def _validation_set(
    run_dir: str | Path, tokenizer: Any, fields: dict[str, Any], max_rows: int
) -> dict[str, Any] | None:
    from core.config import JobConfig
    from core.rundir import RunDir
    from core.tokenize import encode_classification
    from core.train_setup import prepare_data

    cfg = RunDir(run_dir).read_config()
    if not cfg or not isinstance(cfg.get("config"), dict):
        return None
    data = prepare_data(JobConfig.from_dict(dict(cfg["config"])))
    regression = data.problem_type == "regression"
    labels = fields.get("labels") or data.labels
    label2id = None if regression else {str(lab): i for i, lab in enumerate(labels or [])}
    max_length = int(fields.get("max_length") or 128)
    records = data.val[:max_rows]
    if not records:
        return None
    enc = encode_classification(records, tokenizer, max_length, label2id)
    return {
        "examples": enc.examples,
        "pad_token_id": getattr(tokenizer, "pad_token_id", None) or 0,
        "regression": regression,
    }
