"""The inference endpoint's precision follows the rule: the job's serving_precision, else
int8 only when the hashed report shows int8 within tolerance of fp32 (core.quantize)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from api.inference.backends import load_artifact_backend
from core.quantize import int8_verdict


def _quantized(module: torch.nn.Module) -> bool:
    return any("quantized" in type(m).__module__ for m in module.modules())


def _artifact(root: Path, name: str, precision: str | None, cls: bool = True) -> Path:
    from core.artifacts import save_artifact
    from core.prune import prune_model
    from tests.support.prune_fixtures import apply_pattern
    from tests.support.tiny_models import (
        BERT_LABELS,
        build_bert_tokenizer,
        build_llama_tokenizer,
        build_tiny_bert_cls,
        build_tiny_llama,
    )

    hp = {"serving_precision": precision} if precision else {}
    if cls:
        model = apply_pattern(build_tiny_bert_cls(seed=3), "heads", seed=3)
        tok = build_bert_tokenizer(root / f"tok-{name}")
        kw = {"task": "classification", "labels": BERT_LABELS}
    else:
        model = apply_pattern(build_tiny_llama(seed=3), "heads", seed=3)
        tok = build_llama_tokenizer()
        kw = {"task": "causal_lm"}
    pruned, plan = prune_model(model)
    out = root / name
    save_artifact(
        pruned, tok, out, plan=plan, base_model="tiny",
        training_config={"config": {"hyperparameters": hp}}, **kw,
    )  # fmt: skip
    return out


def _with_report(art: Path, verdict: dict | None, hashed: bool = True) -> None:
    from tests.support.artifacts import reseal

    rep = {"latency": [], "int8": {"serving_backend": "torch", "validation": verdict}}
    (art / "report.json").write_text(json.dumps(rep), encoding="utf-8")
    if hashed:
        reseal(art)


@pytest.mark.parametrize("requested", ["int8", "fp32"])
def test_the_jobs_serving_precision_wins(tmp_path, requested):
    art = _artifact(tmp_path, "a", requested)
    # the report says the opposite of the request: the request still wins
    ok = requested == "fp32"
    _with_report(art, int8_verdict(0.9, 0.9 if ok else 0.5, 100))
    b = load_artifact_backend(art)
    assert b.precision == requested
    assert _quantized(b.model) == (requested == "int8")
    ids = [2, 30, 31, 32, 3]
    from api.inference.backends import Encoded

    res = b.predict([Encoded(ids, [0] * len(ids))])
    assert abs(sum(res[0]["scores"].values()) - 1.0) < 1e-4


def test_auto_uses_int8_only_within_tolerance(tmp_path):
    art = _artifact(tmp_path, "auto", None)
    assert load_artifact_backend(art).precision == "fp32"  # no report: fp32
    _with_report(art, int8_verdict(0.90, 0.897, 100))  # 0.3 point lower: within 0.5
    b = load_artifact_backend(art)
    assert b.precision == "int8" and _quantized(b.model)
    _with_report(art, int8_verdict(0.90, 0.88, 100))  # 2 points lower
    assert load_artifact_backend(art).precision == "fp32"


def test_an_unhashed_report_cannot_switch_to_int8(tmp_path):
    art = _artifact(tmp_path, "forged", "auto")
    _with_report(art, int8_verdict(0.9, 0.9, 100), hashed=False)
    assert load_artifact_backend(art).precision == "fp32"


def test_operator_override_and_int8_generation(tmp_path):
    art = _artifact(tmp_path, "lm", "int8", cls=False)
    b = load_artifact_backend(art)
    assert b.precision == "int8" and _quantized(b.model)
    step = b.new_stepper(16)
    logits = step.prefill([1, 5, 6, 7])
    assert logits.shape[-1] == b.model.config.vocab_size and torch.isfinite(logits).all()
    assert load_artifact_backend(art, precision_override="fp32").precision == "fp32"
