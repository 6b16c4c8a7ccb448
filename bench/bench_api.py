"""Benchmark: N concurrent clients poll job status against uvicorn on PostgreSQL (loopback).

    .venv/bin/python bench/bench_api.py                      # 100 clients, 30 s, 1 poll/s each
    .venv/bin/python bench/bench_api.py --interval 0         # closed loop (as fast as possible)
    .venv/bin/python bench/bench_api.py --duration 5         # smoke run
    .venv/bin/python bench/bench_api.py --compare 8ffd5f5 --uvicorn-workers 2   # before/after

What it does: creates a fresh PostgreSQL database (dropped at the end), migrates it with
``api.db.upgrade``, creates a tenant, a key and a few jobs (queued and running, so both
queue-position and progress paths are exercised), starts uvicorn in a SEPARATE process
(``api.app:create_app`` factory, settings from the environment), then runs the clients in
this process with asyncio + httpx (one connection each) for ``--duration`` seconds.
Latency is measured client-side (request sent -> body read). Prints p50/p90/p99/max,
throughput and the error count (non-200 or transport errors) as a markdown table.

Target (issue 4): p99 <= 50 ms and 0 errors. With ``--interval 0`` latency is bounded by
Little's law (clients / throughput), so report which mode a number comes from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _setup_db(admin_url: str) -> tuple[str, str]:
    import psycopg

    name = f"fg_bench_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return name, f"{base}/{name}"


def _drop_db(admin_url: str, name: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _seed(settings, n_jobs: int) -> tuple[str, list[str]]:
    from api import jobstate
    from api.auth import create_api_key
    from api.db import File, Job, make_sessionmaker, new_id, upgrade

    upgrade(settings)
    factory = make_sessionmaker(settings)
    with factory() as s:
        key = create_api_key(s, "bench")
        from api.auth import authenticate

        tenant = authenticate(s, key).tenant_id
        f = File(
            id=new_id("file-"),
            tenant_id=tenant,
            filename="train.jsonl",
            purpose="fine-tune",
            bytes=10,
            sha256="0" * 64,
            status="processed",
            format="jsonl",
            task="classification",
            n_rows=10,
            storage_key="files/none.jsonl",
        )
        s.add(f)
        ids = []
        for i in range(n_jobs):
            j = Job(
                id=new_id("ftjob-"),
                tenant_id=tenant,
                status=jobstate.QUEUED,
                model="minilm-l6",
                task="classification",
                training_file=f.id,
                hyperparameters={"target_sparsity": 0.4},
                seed=i,
                target_sparsity=0.4,
                step=0,
                cancel_requested=False,
                attempts=0,
                queue="cpu",
            )
            s.add(j)
            ids.append(j.id)
        s.commit()
        for jid in ids[: n_jobs // 2]:  # half running with progress, half queued
            jobstate.claim(s, jid, "bench-worker")
            jobstate.record_progress(s, jid, "bench-worker", step=5, total_steps=100)
    factory.kw["bind"].dispose()
    return key, ids


async def _client(c, i, ids, stop_at, interval, lat, errors, etag=False):
    jid = ids[i % len(ids)]
    tag = None
    # spread the first polls over one interval so clients don't move in lockstep
    if interval > 0:
        await asyncio.sleep(interval * (i / 100.0 % 1.0))
    while time.monotonic() < stop_at:
        t0 = time.perf_counter()
        try:
            headers = {"If-None-Match": tag} if tag else None
            r = await c.get(f"/v1/fine_tuning/jobs/{jid}", headers=headers)
            await r.aread()
            dt = time.perf_counter() - t0
            if r.status_code == 200 or (tag and r.status_code == 304):
                lat.append(dt)
                if etag:
                    tag = r.headers.get("etag") or tag
            else:
                errors.append(f"HTTP {r.status_code}")
        except Exception as exc:  # transport errors count as errors
            dt = time.perf_counter() - t0
            errors.append(type(exc).__name__)
        if interval > 0:
            await asyncio.sleep(max(0.0, interval - dt))


async def _run_load(url, key, ids, clients, duration, interval, etag=False):
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    # One pool with a connection per client: each coroutine holds at most one at a time.
    # (Building 100 httpx clients costs seconds of SSL-context setup on a small machine.)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=10
    ) as c:
        stop_at = time.monotonic() + duration
        t0 = time.monotonic()
        await asyncio.gather(
            *[_client(c, i, ids, stop_at, interval, lat, errors, etag) for i in range(clients)]
        )
        elapsed = time.monotonic() - t0
    return lat, errors, elapsed


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[k]


def _checkout(rev: str) -> Path:
    """The API code at git revision ``rev`` (for a before/after run), in a temp folder."""
    dest = Path(tempfile.mkdtemp(prefix="fg-bench-rev-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "api", "core"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def _cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its children (Linux /proc; 0 elsewhere)."""
    total, todo = 0.0, [pid]
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for t in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (t / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


def _serve_and_load(args, root: Path, workers: int, etag: bool, db_url, data_dir, key, ids):
    """Start uvicorn (code from ``root``) with ``workers`` processes and run the clients."""
    import httpx

    port = _free_port()
    env = {
        **os.environ,
        "FINEGATES_DATABASE_URL": db_url,
        "FINEGATES_DATA_DIR": str(data_dir),
        "PYTHONPATH": str(root),
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--factory", "api.app:create_app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
         "--no-access-log", "--workers", str(workers)],
        cwd=root, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise RuntimeError("uvicorn did not come up")
            time.sleep(0.2)
        # warm-up: a few requests per job (every worker process)
        for _ in range(max(1, workers)):
            for jid in ids:
                httpx.get(
                    f"{url}/v1/fine_tuning/jobs/{jid}", headers={"Authorization": f"Bearer {key}"}
                )
        cpu0 = _cpu_seconds(server.pid)
        lat, errors, elapsed = asyncio.run(
            _run_load(url, key, ids, args.clients, args.duration, args.interval, etag)
        )
        cpu = _cpu_seconds(server.pid) - cpu0
        return lat, errors, elapsed, cpu
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def _row(label: str, lat: list[float], errors: list[str], elapsed: float, cpu: float) -> str:
    ms = [x * 1000 for x in lat]
    per = 1000 * cpu / max(1, len(ms) + len(errors))
    return (
        f"| {label} | {len(ms)} | {len(ms) / elapsed:.0f} | {_pct(ms, 50):.1f} | "
        f"{_pct(ms, 90):.1f} | {_pct(ms, 99):.1f} | {max(ms) if ms else float('nan'):.1f} | "
        f"{len(errors)} | {per:.2f} |"
    )


def compare(args) -> int:
    """``--compare REV``: the API at REV (1 process) and this checkout (1 process, then
    ``--uvicorn-workers`` processes, then the same with ETag revalidation), one after the
    other against the same database, in one run."""
    from api.settings import Settings

    name, db_url = _setup_db(args.pg_admin)
    data_dir = Path(tempfile.mkdtemp(prefix="fg-bench-"))
    before = _checkout(args.compare)
    rows = []
    try:
        key, ids = _seed(Settings(data_dir=data_dir, database_url=db_url), args.jobs)
        n = max(2, args.uvicorn_workers)
        configs = [
            (f"before ({args.compare[:8]}), 1 process", before, 1, False),
            ("after, 1 process", ROOT, 1, False),
            (f"after, {n} processes", ROOT, n, False),
            (f"after, {n} processes, If-None-Match", ROOT, n, True),
        ]
        for label, root, workers, etag in configs:
            lat, errors, elapsed, cpu = _serve_and_load(
                args, root, workers, etag, db_url, data_dir, key, ids
            )
            rows.append(_row(label, lat, errors, elapsed, cpu))
            print(rows[-1], flush=True)
    finally:
        _drop_db(args.pg_admin, name)
    mode = "closed loop" if args.interval <= 0 else f"1 poll / {args.interval:g} s per client"
    print(f"\nGET /v1/fine_tuning/jobs/{{id}}: {args.clients} clients x {args.duration:g} s each, "
          f"{mode}, PostgreSQL on loopback, {os.cpu_count()} CPUs (load generator on the same "
          f"machine)\n")  # fmt: skip
    print(
        "| API | requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors | API CPU ms/poll |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between polls per client; 0 = closed loop",
    )
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument(
        "--pg-admin",
        default=os.environ.get(
            "FINEGATES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    ap.add_argument("--uvicorn-workers", type=int, default=1)
    ap.add_argument(
        "--compare",
        metavar="GIT_REV",
        help="side by side: the API at GIT_REV vs this checkout (1 and N processes, ETag)",
    )
    args = ap.parse_args(argv)
    if args.compare:
        return compare(args)

    from api.settings import Settings

    name, db_url = _setup_db(args.pg_admin)
    data_dir = Path(tempfile.mkdtemp(prefix="fg-bench-"))
    try:
        key, ids = _seed(Settings(data_dir=data_dir, database_url=db_url), args.jobs)
        lat, errors, elapsed, _cpu = _serve_and_load(
            args, ROOT, args.uvicorn_workers, False, db_url, data_dir, key, ids
        )
    finally:
        _drop_db(args.pg_admin, name)

    ms = [x * 1000 for x in lat]
    mode = "closed loop" if args.interval <= 0 else f"1 poll / {args.interval:g} s per client"
    print(f"\nGET /v1/fine_tuning/jobs/{{id}}: {args.clients} clients, {elapsed:.1f} s, {mode}, "
          f"uvicorn workers={args.uvicorn_workers}, PostgreSQL on loopback, {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| requests | req/s | p50 ms | p90 ms | p99 ms | max ms | errors |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(ms)} | {len(ms) / elapsed:.0f} | {_pct(ms, 50):.1f} | {_pct(ms, 90):.1f} | "
        f"{_pct(ms, 99):.1f} | {max(ms) if ms else float('nan'):.1f} | {len(errors)} |"
    )
    if errors:
        print("\nerrors:", statistics.multimode(errors), f"({len(errors)} total)")
    target_ok = bool(ms) and _pct(ms, 99) <= 50.0 and not errors
    print(f"\ntarget p99 <= 50 ms and 0 errors: {'met' if target_ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
