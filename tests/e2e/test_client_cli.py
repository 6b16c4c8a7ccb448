"""The client CLI (`finegates files|jobs|models download`) end to end, as a user runs it:
separate processes talking REST to the real API + worker (SQLite stack).

Upload (file id on the last line) -> create (job id on the last line) -> watch to success
(exit 0, the compression summary) -> download as tar and load it, and as safetensors;
then the error paths: a bad file (line number, non-zero), a bad key, a failed job (watch
exits 1 with the error), a cancelled one (exit 2).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.e2e import ROOT, TINY_MODEL_ID

pytestmark = pytest.mark.e2e

SHORT = ["--hp", "max_steps=20", "--hp", "batch_size=8", "--hp", "eval_interval=10",
         "--hp", "max_length=32", "--hp", "target_sparsity=0.3"]  # fmt: skip


def _cli(stack: Any, *argv: str, key: str | None = None, timeout: float = 300) -> Any:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEGATES_")}
    env.update(FINEGATES_API_URL=stack.base_url, FINEGATES_API_KEY=key or stack.key)
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *argv],
        cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _last_line(out: str) -> str:
    return out.strip().splitlines()[-1].strip()


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_cli_upload_create_watch_download(stack: Any, reviews: bytes, tmp_path: Path) -> None:
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(reviews)
    up = _cli(stack, "files", "upload", str(data))
    assert up.returncode == 0, up.stderr
    file_id = _last_line(up.stdout)
    assert file_id.startswith("file-"), up.stdout
    assert "60 rows" in up.stdout

    cr = _cli(stack, "jobs", "create", "--model", TINY_MODEL_ID, "--training-file", file_id,
              "--suffix", "cli", *SHORT)  # fmt: skip
    assert cr.returncode == 0, cr.stderr
    job_id = _last_line(cr.stdout)
    assert job_id.startswith("ftjob-"), cr.stdout

    w = _cli(stack, "jobs", "watch", job_id, "--interval", "0.5")
    assert w.returncode == 0, (w.stdout, w.stderr, stack.worker_log())
    assert f"{job_id}: succeeded" in w.stdout
    assert "gated weights removed" in w.stdout and "latency torch" in w.stdout
    assert "20/20" in w.stderr  # the tqdm bar reached the last step
    model_id = stack.get_job(job_id)["fine_tuned_model"]
    assert f"fine-tuned model: {model_id}" in w.stdout

    got = _cli(stack, "jobs", "get", job_id, "--json")
    assert got.returncode == 0 and json.loads(got.stdout)["status"] == "succeeded"
    ls = _cli(stack, "jobs", "list")
    assert ls.returncode == 0 and job_id in ls.stdout and "succeeded" in ls.stdout
    ls_json = json.loads(_cli(stack, "jobs", "list", "--json").stdout)
    assert [j["id"] for j in ls_json["data"]] == [job_id]

    out = tmp_path / "artifact"
    dl = _cli(stack, "models", "download", model_id, "--output", str(out))
    assert dl.returncode == 0, dl.stderr
    assert Path(_last_line(dl.stdout)) == out
    from core.artifacts import load_artifact

    art = load_artifact(out)  # hash-checked, strict
    assert art.manifest.task == "classification"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".download-")]
    st = _cli(stack, "models", "download", model_id, "--output", str(tmp_path / "st"),
              "--format", "safetensors")  # fmt: skip
    assert st.returncode == 0, st.stderr
    assert (tmp_path / "st" / "model.safetensors").read_bytes() == (
        out / "model.safetensors"
    ).read_bytes()
    # the registry commands still sit beside download
    assert "register" in _cli(stack, "models", "--help").stdout


@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_cli_error_paths(stack: Any, reviews: bytes, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "broken"\n')
    up = _cli(stack, "files", "upload", str(bad))
    assert up.returncode != 0
    assert "line 2" in up.stderr and "Traceback" not in up.stderr

    wrong = _cli(stack, "jobs", "list", key="fg-not-a-key")
    assert wrong.returncode != 0 and "API key was not accepted" in wrong.stderr

    missing = _cli(stack, "jobs", "get", "ftjob-nope")
    assert missing.returncode != 0 and "ftjob-nope" in missing.stderr

    # a failed job: a registered model whose weights are garbage fails in the worker
    from core.catalog import register_model
    from tests.support.tiny_models import save_tiny_bert

    broken = save_tiny_bert(tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not safetensors at all")
    register_model("broken-bert", broken, stack.settings.data_path)
    data = tmp_path / "reviews.jsonl"
    data.write_bytes(reviews)
    file_id = _last_line(_cli(stack, "files", "upload", str(data)).stdout)
    cr = _cli(stack, "jobs", "create", "--model", "broken-bert", "--training-file", file_id, *SHORT)
    assert cr.returncode == 0, cr.stderr
    w = _cli(stack, "jobs", "watch", _last_line(cr.stdout), "--interval", "0.5")
    assert w.returncode == 1, (w.stdout, w.stderr)
    assert "failed" in w.stdout and "error [" in w.stderr

    # a cancelled job: watch exits 2
    cr = _cli(stack, "jobs", "create", "--model", TINY_MODEL_ID, "--training-file", file_id,
              "--hp", "max_steps=5000", "--hp", "batch_size=8")  # fmt: skip
    job_id = _last_line(cr.stdout)
    stack.wait_job(job_id, until=lambda j: j["status"] == "running", what="running")
    cancel = _cli(stack, "jobs", "cancel", job_id)
    assert cancel.returncode == 0 and "cancel" in cancel.stdout
    w = _cli(stack, "jobs", "watch", job_id, "--interval", "0.5")
    assert w.returncode == 2 and "cancelled" in w.stderr
