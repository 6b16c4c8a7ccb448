"""`finegates train` contract: runs to the end, writes the run dir, names bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from core.cli import build_parser, main, parse_hp

ROOT = Path(__file__).resolve().parents[2]


def _data(tmp_path):
    rows = [{"text": f"the movie was {w}", "label": lab}
            for w, lab in [("good", "pos"), ("bad", "neg"), ("great", "pos"), ("awful", "neg")] * 5]  # fmt: skip
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_train_end_to_end(tiny_bert_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", "--model", str(tiny_bert_dir), "--training-file", str(_data(tmp_path)),
               "--task", "classification", "--hp", "max_steps=4", "--hp", "batch_size=4",
               "--hp", "eval_interval=2", "--hp", "target_sparsity=0.2", "--output", str(out),
               "--quiet"])  # fmt: skip
    assert rc == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert {"step", "accuracy", "f1", "mcc", "measured_sparsity"} <= set(r)
        assert 0.0 <= r["measured_sparsity"] <= 1.0
    assert (out / "final" / "gated_state.safetensors").is_file()
    assert list((out / "checkpoints").glob("step-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["config"]["hyperparameters"]["target_sparsity"] == 0.2
    assert cfg["config"]["hyperparameters"]["max_steps"] == 4
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["status"] == "completed" and summary["steps"] == 4


def test_config_file_and_flags_merge(tmp_path):
    cfg = tmp_path / "job.json"
    cfg.write_text(json.dumps({"model": "m", "training_file": "t.jsonl",
                               "hyperparameters": {"target_sparsity": 0.3, "batch_size": 8}}))  # fmt: skip
    args = build_parser().parse_args(
        ["train", "--config", str(cfg), "--hp", "batch_size=4", "--output", "o"]
    )
    from core.cli import build_config

    job = build_config(args)
    assert job.model == "m" and job.hyperparameters.target_sparsity == 0.3
    assert job.hyperparameters.batch_size == 4
    assert parse_hp(['targets=["query","value"]', "kurtosis=true"]) == {
        "targets": ["query", "value"],
        "kurtosis": True,
    }


def test_bad_data_exits_nonzero_naming_the_line(tiny_bert_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok", "label": "a"}\n{"text": "oops", "label": }\n')
    rc = main(["train", "--model", str(tiny_bert_dir), "--training-file", str(bad),
               "--output", str(tmp_path / "r"), "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2
    assert "line 2" in err and str(bad) in err


def test_bad_hyperparameter_exits_nonzero_naming_it(tmp_path):
    # through a real process, as the console script runs it
    r = subprocess.run(
        [sys.executable, "-m", "core.cli", "train", "--model", "minilm-l6", "--training-file",
         "x.jsonl", "--hp", "target_sparsity=1.7", "--output", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2
    assert "target_sparsity" in r.stderr and "[0.0, 0.95]" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "core.cli", "train", "--model", "minilm-l6", "--training-file",
         "x.jsonl", "--hp", "warp_factor=9", "--output", str(tmp_path / "r")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode == 2 and "warp_factor" in r.stderr
