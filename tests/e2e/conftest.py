"""End-to-end stacks: the real API (uvicorn on a free port, in this process) plus a REAL
Celery worker in a separate process, on two backends:

- ``sqlite``:   SQLite + the embedded SQL broker (what `finegates serve` runs)
- ``postgres``: PostgreSQL + Redis (production); skipped locally when either is down,
                FAILS under CI=true.

Each stack is module-scoped (one worker start per module and backend). The worker's
heartbeat timeout is short (FINEGATES_HEARTBEAT_TIMEOUT_S) so the crash test does not
wait minutes for the reaper, and training steps are paced (tests/e2e/worker_main.py) so
a job is observably "in progress" on a tiny model.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.e2e import ROOT, TINY_MODEL_ID, free_port, movie_reviews_jsonl

PG_ADMIN = os.environ.get("FINEGATES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_HOST = os.environ.get("FINEGATES_TEST_REDIS_HOST", "127.0.0.1")
IN_CI = os.environ.get("CI", "").lower() == "true"
HEARTBEAT_TIMEOUT_S = 8.0
STEP_DELAY_S = 0.05
TERMINAL = {"succeeded", "failed", "cancelled"}


def _unavailable(what: str, exc: BaseException) -> None:
    if IN_CI:
        pytest.fail(f"{what} is required under CI=true but unreachable: {exc}")
    pytest.skip(f"{what} unreachable ({exc}); skipped locally, fails under CI=true")


@dataclass
class Stack:
    name: str
    settings: Any
    env: dict[str, str]
    base_url: str
    key: str
    data_dir: Path
    log_path: Path
    sessions: Any
    worker: subprocess.Popen[bytes] | None = None
    _logs: list[Any] = field(default_factory=list)

    # --- worker process ------------------------------------------------------------
    def start_worker(self) -> None:
        log = self.log_path.open("ab")
        self._logs.append(log)
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.worker_main"],
            cwd=str(ROOT),
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_worker(self) -> None:
        """SIGKILL the worker's whole process group: a machine dying mid-step."""
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=30)

    def stop_worker(self) -> None:
        if self.worker is None or self.worker.poll() is not None:
            return
        os.killpg(self.worker.pid, signal.SIGTERM)
        try:
            self.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=30)

    def close(self, server: Any, thread: threading.Thread) -> None:
        """Stop the worker, then the API server; release the pool and the logs."""
        self.stop_worker()
        server.should_exit = True
        thread.join(timeout=30)
        self.sessions.kw["bind"].dispose()
        for log in self._logs:
            log.close()

    def worker_log(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # --- HTTP ----------------------------------------------------------------------
    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {key or self.key}"},
            timeout=60,
        )

    def upload(self, content: bytes, filename: str = "reviews.jsonl") -> str:
        with self.client() as c:
            r = c.post(
                "/v1/files",
                files={"file": (filename, content, "application/jsonl")},
                data={"purpose": "fine-tune"},
            )
        assert r.status_code in (200, 201), r.text
        return r.json()["id"]

    def create_job(self, training_file: str, **hyperparameters: Any) -> dict[str, Any]:
        body = {
            "model": TINY_MODEL_ID,
            "training_file": training_file,
            "suffix": "e2e",
            "seed": 7,
            "method": {
                "type": "finegates",
                "finegates": {"task": "classification", "hyperparameters": hyperparameters},
            },
        }
        with self.client() as c:
            r = c.post("/v1/fine_tuning/jobs", json=body)
        assert r.status_code in (200, 201), r.text
        return r.json()

    def get_job(self, job_id: str) -> dict[str, Any]:
        with self.client() as c:
            r = c.get(f"/v1/fine_tuning/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_job(
        self,
        job_id: str,
        until: Callable[[dict[str, Any]], bool] = lambda j: j["status"] in TERMINAL,
        timeout: float = 300.0,
        what: str = "a terminal status",
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get_job(job_id)
            if until(job):
                return job
            if job["status"] in TERMINAL:
                break
            if self.worker is not None and self.worker.poll() is not None:
                break
            time.sleep(0.3)
        raise AssertionError(
            f"job {job_id} did not reach {what}; last state: {json.dumps(job)[:1500]}\n"
            f"--- worker log tail ({self.name}) ---\n{self.worker_log()}"
        )

    def list_all(self, path: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        with self.client() as c:
            for _ in range(200):
                params: dict[str, Any] = {"limit": 100}
                if after:
                    params["after"] = after
                r = c.get(path, params=params)
                assert r.status_code == 200, r.text
                body = r.json()
                out.extend(body["data"])
                if not body.get("has_more") or not body["data"]:
                    break
                after = body["data"][-1]["id"]
        return out

    def download_artifact(self, model_id: str, dest: Path) -> Path:
        with self.client() as c:
            r = c.get(f"/v1/models/{model_id}/artifact")
        assert r.status_code == 200, r.text[:500]
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:*") as tar:
            tar.extractall(dest, filter="data")
        return dest


def _start_api(settings: Any) -> tuple[Any, threading.Thread, str]:
    import uvicorn

    from api.app import create_app

    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}"


def _pg_database() -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"fg_e2e_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}", drop


def _redis_db() -> tuple[str, Callable[[], None]]:
    """An empty Redis database number, so parallel suites do not share queues."""
    import redis

    probe = redis.Redis(host=REDIS_HOST, port=6379, socket_connect_timeout=3)
    probe.ping()
    start = secrets.randbelow(15)
    for i in range(15):
        db = 1 + (start + i) % 15
        r = redis.Redis(host=REDIS_HOST, port=6379, db=db, socket_connect_timeout=3)
        if r.dbsize() == 0:
            return f"redis://{REDIS_HOST}:6379/{db}", r.flushdb
    raise RuntimeError("no empty Redis database (1-15) available")


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from api.auth import create_api_key
    from api.db import make_sessionmaker, session_scope, upgrade
    from api.settings import Settings
    from core.catalog import register_model
    from tests.support.tiny_models import save_tiny_bert

    backend = request.param
    data_dir = tmp_path_factory.mktemp(f"e2e-{backend}")
    cleanups: list[Callable[[], None]] = []
    database_url = broker_url = None
    if backend == "postgres":
        try:
            database_url, drop_db = _pg_database()
        except Exception as exc:
            _unavailable("PostgreSQL", exc)
        cleanups.append(drop_db)
        try:
            broker_url, flush = _redis_db()
        except Exception as exc:
            for c in cleanups:
                c()
            _unavailable("Redis", exc)
        cleanups.append(flush)

    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
        "job_max_attempts": 3,
        "auth_cache_seconds": 0,
    }
    if database_url:
        values["database_url"] = database_url
    if broker_url:
        values["broker_url"] = broker_url
    settings = Settings(**values)
    upgrade(settings)
    register_model(TINY_MODEL_ID, save_tiny_bert(data_dir / "tiny-bert"), settings.data_path)
    sessions = make_sessionmaker(settings)
    with session_scope(sessions) as s:
        key = create_api_key(s, "e2e")

    env = {k: v for k, v in os.environ.items() if not k.startswith("FINEGATES_")}
    env.update({f"FINEGATES_{k.upper()}": str(v) for k, v in values.items()})
    env["FINEGATES_E2E_STEP_DELAY"] = str(STEP_DELAY_S)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")

    server, thread, base_url = _start_api(settings)
    st = Stack(
        name=backend,
        settings=settings,
        env=env,
        base_url=base_url,
        key=key,
        data_dir=settings.data_path,
        log_path=data_dir / "worker.log",
        sessions=sessions,
    )
    st.start_worker()
    try:
        yield st
    finally:
        st.close(server, thread)
        from worker.celery_app import reset_app

        reset_app()
        for c in reversed(cleanups):
            try:
                c()
            except Exception:
                pass


@pytest.fixture(scope="module")
def reviews() -> bytes:
    return movie_reviews_jsonl(60)
