"""int8 on top of pruning: the hashed int8 ONNX file, the report's int8 rows and
validation accuracy, and the serving-precision rule (core.quantize)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.artifacts import load_artifact, read_manifest, sha256_file
from core.onnx_export import OnnxRunner
from core.package import build_artifact
from core.quantize import INT8_ONNX, choose_precision, int8_verdict, torch_int8
from core.rundir import RunDir
from tests.support.artifacts import bert_run
from tests.support.prune_fixtures import close_rows, gate
from tests.support.tiny_models import build_tiny_bert_cls

FAST = {"shapes": ((1, 8), (4, 16)), "runs": 3, "warmup": 0}
LABELS = ["negative", "neutral", "positive"]


@pytest.fixture(scope="module")
def run_with_data(tmp_path_factory) -> Path:
    """A gated tiny BERT run whose config.json names a real training file (so packaging
    can read the validation split again)."""
    model = gate(build_tiny_bert_cls(seed=0))
    for lyr in model.bert.encoder.layer:
        close_rows(lyr.intermediate.dense, range(0, 64, 3))
    root = tmp_path_factory.mktemp("q")
    run = bert_run(root / "run", model, root / "tok")
    data = root / "train.jsonl"
    words = ["good", "bad", "fine", "movie", "plot", "actor", "great", "awful"]
    with data.open("w", encoding="utf-8") as f:
        for i in range(200):
            text = " ".join(words[(i * k + 3) % len(words)] for k in range(1, 6 + i % 5))
            f.write(json.dumps({"text": text, "label": LABELS[i % 3]}) + "\n")
    config = {
        "model": "tiny-bert",
        "training_file": str(data),
        "task": "classification",
        "labels": LABELS,
        "validation_split": 0.25,
        "hyperparameters": {"serving_precision": "int8", "max_length": 32},
    }
    RunDir(run).write_config(
        {
            "config": config,
            "engine_version": "test",
            "model_path": "tiny",
            "family": "bert",
            "n_train_examples": 150,
            "n_val_examples": 50,
            "total_steps": 1,
            "trainable_params": 1,
            "warnings": [],
        }  # fmt: skip
    )
    return run


def test_artifact_carries_a_hashed_int8_onnx_that_matches_fp32(run_with_data, tmp_path):
    res = build_artifact(run_with_data, tmp_path / "art", **FAST)
    art = tmp_path / "art"
    files = read_manifest(art).files
    assert INT8_ONNX in files and files[INT8_ONNX]["sha256"] == sha256_file(art / INT8_ONNX)
    assert "onnx-int8" in res.formats
    # smaller than fp32 ONNX (int8 weights) and close to the fp32 model's outputs
    assert (art / INT8_ONNX).stat().st_size < (art / "model.onnx").stat().st_size
    la = load_artifact(art)  # still verifies with the int8 file hashed
    ids = torch.randint(5, 100, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = la.model(ids)
    out = OnnxRunner(art / INT8_ONNX)(ids)
    assert out.shape == ref.shape
    scale = float(ref.abs().max())
    assert float((out - ref).abs().max()) < 0.1 * scale + 1e-3
    assert not torch.equal(out, ref)  # it is really quantized


def test_report_has_int8_rows_and_validation_accuracy(run_with_data, tmp_path):
    rep = build_artifact(run_with_data, tmp_path / "art", **FAST).report
    assert rep is not None
    rows = rep["latency"]
    keys = {(r["backend"], r["precision"], r["batch"], r["seq_len"]) for r in rows}
    assert keys == {
        (b, p, n, t)
        for b in ("torch", "onnxruntime")
        for p in ("fp32", "int8")
        for n, t in ((1, 8), (4, 16))
    }
    for r in rows:
        fp32 = next(
            x for x in rows
            if (x["backend"], x["batch"], x["seq_len"], x["precision"])
            == (r["backend"], r["batch"], r["seq_len"], "fp32")
        )  # fmt: skip
        assert r["vs_dense_fp32"] == pytest.approx(r["pruned_ms"] / fp32["dense_ms"], rel=1e-2)
        assert r["ratio"] == pytest.approx(r["pruned_ms"] / r["dense_ms"], rel=1e-2)
        assert 1 <= r["runs"] <= 3
        lo, hi = r["ratio_ci95"]
        assert lo <= hi
    val = rep["int8"]["validation"]
    assert val["metric"] == "accuracy" and val["examples"] == 50
    assert 0.0 <= val["int8"] <= 1.0 and 0.0 <= val["fp32"] <= 1.0
    assert val["int8_loss"] == pytest.approx(val["fp32"] - val["int8"])
    assert val["within_tolerance"] == (val["int8_loss"] <= val["tolerance"])
    assert rep["int8"]["serving_backend"] in ("torch", "onnxruntime")
    t = rep["timing"]
    assert t["budget_s"] == 30.0 and isinstance(t["warnings"], list)


def test_report_without_validation_data_says_so(run_with_data, tmp_path):
    # the run's data file is gone: the report is still written, validation is None
    rd = RunDir(run_with_data)
    cfg = rd.read_config()
    assert cfg is not None
    moved = dict(cfg)
    moved["config"] = dict(cfg["config"], training_file=str(tmp_path / "gone.jsonl"))
    copy_run = tmp_path / "run2"
    import shutil

    shutil.copytree(run_with_data, copy_run)
    RunDir(copy_run).write_config(moved)  # type: ignore[arg-type]
    rep = build_artifact(copy_run, tmp_path / "art", **FAST).report
    assert rep is not None and rep["int8"]["validation"] is None


def test_torch_int8_quantizes_linears_and_stays_close():
    from core.prune import prune_model
    from tests.support.prune_fixtures import apply_pattern, reference_plan

    model = apply_pattern(build_tiny_bert_cls(seed=0), "heads", seed=2)
    pm = prune_model(model, reference_plan(model))[0].eval()
    q = torch_int8(pm)
    kinds = {type(m).__name__ for m in q.modules()}
    assert "Linear" in kinds  # torch.ao.nn.quantized.dynamic.Linear keeps the name
    assert any("quantized" in type(m).__module__ for m in q.modules())
    assert not any("quantized" in type(m).__module__ for m in pm.modules())  # a copy
    ids = torch.randint(5, 100, (2, 10))
    with torch.no_grad():
        a, b = pm(ids), q(ids)
    assert float((a - b).abs().max()) < 0.1 * float(a.abs().max()) + 1e-3


def test_precision_rule():
    within = {"int8": {"validation": int8_verdict(0.900, 0.897, 100)}}
    outside = {"int8": {"validation": int8_verdict(0.900, 0.880, 100)}}
    assert within["int8"]["validation"]["within_tolerance"] is True
    assert outside["int8"]["validation"]["within_tolerance"] is False
    assert choose_precision("int8", outside)[0] == "int8"  # the job asked: always int8
    assert choose_precision("fp32", within)[0] == "fp32"
    assert choose_precision("auto", within)[0] == "int8"
    assert choose_precision(None, within)[0] == "int8"
    assert choose_precision("auto", outside)[0] == "fp32"
    assert choose_precision("auto", {})[0] == "fp32"  # nothing measured: fp32
    assert choose_precision("auto", None)[0] == "fp32"
    reg = int8_verdict(0.10, 0.1004, 10, regression=True)  # mse: relative tolerance
    assert reg["metric"] == "mse" and reg["within_tolerance"] is True
    assert int8_verdict(0.10, 0.2, 10, regression=True)["within_tolerance"] is False
