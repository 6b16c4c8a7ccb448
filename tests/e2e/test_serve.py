"""`finegates serve`: one command starts the API and a real worker, prints a first-start
key, runs a job, shuts both down on Ctrl-C, and keeps its data across restarts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.e2e import ROOT, TINY_MODEL_ID, free_port, movie_reviews_jsonl

pytestmark = pytest.mark.e2e


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purpose
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Serve:
    def __init__(self, data_dir: Path, port: int, *extra: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINEGATES_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
        exe = Path(sys.executable).parent / "finegates"
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "worker.cli"]
        cmd += ["serve", "--port", str(port), "--data-dir", str(data_dir), *extra]
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.base = f"http://127.0.0.1:{port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines[-80:])

    def wait_ready(self, timeout: float = 180, worker: bool = True) -> None:
        deadline = time.monotonic() + timeout
        api_ok, worker_ok = False, not worker
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            if not api_ok:
                try:
                    api_ok = httpx.get(f"{self.base}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    pass
            worker_ok = worker_ok or any(" ready." in ln for ln in self.lines)
            if api_ok and worker_ok:
                return
            time.sleep(0.3)
        raise AssertionError(f"serve did not become ready:\n{self.output()}")

    def interrupt(self, timeout: float = 120) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout=timeout)


def test_serve_runs_api_and_worker_and_stops_cleanly(tmp_path: Path) -> None:
    from core.catalog import register_model
    from tests.support.tiny_models import save_tiny_bert

    data = tmp_path / "data"
    data.mkdir()
    register_model(TINY_MODEL_ID, save_tiny_bert(tmp_path / "tiny"), data)

    srv = Serve(data, free_port())
    try:
        srv.wait_ready()
        out = srv.output()
        m = re.search(r"Created the local API key.*\n\s+(\S+)", out)
        assert m, out
        key = m.group(1)
        assert (data / "local-api-key.txt").read_text().strip() == key
        worker_pids = _children(srv.proc.pid)
        assert worker_pids, "serve started no worker process"

        h = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=srv.base, headers=h, timeout=60) as c:
            f = c.post(
                "/v1/files",
                files={"file": ("r.jsonl", movie_reviews_jsonl(40), "application/jsonl")},
                data={"purpose": "fine-tune"},
            )
            assert f.status_code in (200, 201), f.text
            hp = {"max_steps": 6, "batch_size": 8, "eval_interval": 3, "max_length": 32}
            body = {
                "model": TINY_MODEL_ID,
                "training_file": f.json()["id"],
                "method": {"type": "finegates", "finegates": {"hyperparameters": hp}},
            }
            j = c.post("/v1/fine_tuning/jobs", json=body)
            assert j.status_code in (200, 201), j.text
            job_id = j.json()["id"]
            deadline = time.monotonic() + 300
            while True:
                job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    break
                assert time.monotonic() < deadline, (job, srv.output())
                time.sleep(0.5)
            assert job["status"] == "succeeded", (job, srv.output())

        assert srv.interrupt() == 0, srv.output()
        for pid in worker_pids:
            deadline = time.monotonic() + 30
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            assert not _alive(pid), f"worker {pid} outlived serve"
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()

    # A restart keeps the data and the key, and creates no new one (API only, to save time).
    srv2 = Serve(data, free_port(), "--no-worker")
    try:
        srv2.wait_ready(worker=False)
        assert "Created the local API key" not in srv2.output()
        with httpx.Client(base_url=srv2.base, headers=h, timeout=60) as c:
            assert c.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "succeeded"
            models = {m["id"] for m in c.get("/v1/models").json()["data"]}
            assert job["fine_tuned_model"] in models
        assert srv2.interrupt() == 0, srv2.output()
    finally:
        if srv2.proc.poll() is None:
            srv2.proc.kill()
            srv2.proc.wait()
