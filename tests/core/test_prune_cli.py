"""`finegates prune RUN_DIR --output`, `export --onnx`, `bench --json` (contract keys)."""

from __future__ import annotations

import json

import pytest

from core.cli import main
from core.gates import gated_modules
from core.rundir import RunDir
from tests.support.prune_fixtures import apply_pattern
from tests.support.tiny_models import build_llama_tokenizer, build_tiny_llama


@pytest.fixture
def llama_run(tmp_path):
    model = apply_pattern(build_tiny_llama(seed=0), "heads")
    info = {
        "base_model": "tiny-llama",
        "family": "llama",
        "task": "causal_lm",
        "gated_modules": list(gated_modules(model)),
        "gate_config": {"seed": 0},
        "head_modules": [],
    }
    RunDir(tmp_path / "run").write_final(model, build_llama_tokenizer(), info)
    return tmp_path / "run"


def test_prune_export_bench_commands(llama_run, tmp_path, capsys):
    art = tmp_path / "artifact"
    assert main(["prune", str(llama_run), "--output", str(art)]) == 0
    assert (art / "manifest.json").is_file() and (art / "model.safetensors").is_file()
    assert main(["export", str(art), "--onnx"]) == 0
    manifest = json.loads((art / "manifest.json").read_text())
    assert "model.onnx" in manifest["files"]
    capsys.readouterr()
    rc = main(
        ["bench", str(art), "--json", "--runs", "2", "--warmup", "1", "--shapes", "1x8,2x16",
         "--decode-tokens", "3"]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object
    for key in ("params_before", "params_after", "gated_params_before", "gated_params_after",
                "max_abs_diff_vs_gated", "flop_ideal_ratio", "latency"):  # fmt: skip
        assert key in report, key
    assert report["params_after"] < report["params_before"]
    assert report["gated_params_after"] < report["gated_params_before"]
    assert report["max_abs_diff_vs_gated"] < 1e-4
    assert 0 < report["flop_ideal_ratio"] < 1
    rows = {(r["backend"], r["batch"], r["seq_len"]) for r in report["latency"]}
    assert rows == {(b, n, t) for b in ("torch", "onnxruntime") for n, t in ((1, 8), (2, 16))}
    for r in report["latency"]:
        assert r["ratio"] == pytest.approx(r["pruned_ms"] / r["dense_ms"], rel=1e-2)
    assert report["decode"]["pruned_tok_s"] > 0
    assert json.loads((art / "report.json").read_text())["latency"]


def test_bench_on_corrupted_artifact_is_a_user_error(llama_run, tmp_path, capsys):
    art = tmp_path / "artifact"
    assert main(["prune", str(llama_run), "--output", str(art)]) == 0
    w = art / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    assert main(["bench", str(art), "--json"]) != 0
    assert "invalid_artifact" in capsys.readouterr().err
