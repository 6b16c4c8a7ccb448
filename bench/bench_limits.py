"""Limits and abuse (issue 12), each measured side by side with its peer in one run.

1. Upload validation peak memory, 20 MB and 200 MB CSV: the streaming validator
   (core.data.validate_file) vs the one before it (core/data.py at 8ffd5f5, read from git),
   each in a fresh process (peak RSS minus the RSS before validating).
2. /health latency while a 3 MB prompt is tokenized: tokenizing off the event loop (now)
   vs on it (as before), same server, same prompt.
3. Another tenant's latency while one tenant floods the API: tenant B polls GET /v1/files
   alone, then while tenant A floods with 16 connections, with rate limits on (A at its
   limit, answered 429) and off.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_limits.py [--quick] [--only 1,2,3]

--quick: 20 MB only for (1), shorter runs for (3). Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OLD_REV = "8ffd5f5"

# ---------------------------------------------------------------- 1. validation memory

_CHILD = r"""
import importlib.util, sys, time
which, path = sys.argv[1], sys.argv[2]
if which == "old":
    spec = importlib.util.spec_from_file_location("old_data", sys.argv[3])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_data"] = mod
    spec.loader.exec_module(mod)
else:
    import core.data as mod

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])  # KiB

with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to the current RSS
    fh.write("5")
before = status("VmRSS")
t0 = time.perf_counter()
rep = mod.validate_file(path)
dt = time.perf_counter() - t0
print(status("VmHWM") - before, rep.n_rows, round(dt, 2))
"""


def _write_csv(path: Path, target_bytes: int) -> None:
    # ~400 bytes a row: 200 MB stays under the 1,000,000-row limit
    words = "with a comma, and enough words to look like a real review of a film " * 5
    row = '"review {i} ' + words + '",{lab}\n'
    with path.open("w", encoding="utf-8") as fh:
        fh.write("text,label\n")
        i, size = 0, 0
        while size < target_bytes:
            line = row.format(i=i, lab="pos" if i % 2 else "neg")
            fh.write(line)
            size += len(line)
            i += 1


def bench_validation(quick: bool) -> None:
    old_src = subprocess.run(
        ["git", "show", f"{OLD_REV}:core/data.py"], cwd=ROOT, capture_output=True, text=True
    )
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "old_data.py"
        old_path.write_text(old_src.stdout if old_src.returncode == 0 else "")
        sizes = [20] if quick else [20, 200]
        for mb in sizes:
            csv_path = Path(tmp) / f"data_{mb}mb.csv"
            _write_csv(csv_path, mb * 1024 * 1024)
            res = {}
            for which in ("old", "new"):
                if which == "old" and old_src.returncode != 0:
                    continue
                out = subprocess.run(
                    [sys.executable, "-c", _CHILD, which, str(csv_path), str(old_path)],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
                if out.returncode != 0:
                    print(f"validation {which} {mb} MB failed: {out.stderr[-400:]}")
                    continue
                kib, rows, secs = out.stdout.split()
                res[which] = int(kib)
                print(
                    f"validation peak extra memory, {mb} MB CSV ({rows} rows): "
                    f"{which:>3} {int(kib):9d} KiB ({int(kib) / 1024:.1f} MiB) in {secs} s"
                )
            if "old" in res and "new" in res:
                print(
                    f"validation {mb} MB: old {res['old'] / 1024:.1f} MiB vs new {res['new']} KiB "
                    f"(a page is 4 KiB)"
                )
            csv_path.unlink()


# ---------------------------------------------------------------- 2. health while tokenizing


def bench_health() -> None:
    import httpx

    import api.routes.inference as inference_routes
    from api.inference import InferenceConfig, InferenceEngine
    from api.inference.app import create_inference_app
    from api.inference.resolver import DbModelResolver
    from tests.support.inference import ServerThread, make_deployment
    from tests.support.tiny_models import save_tiny_bert, save_tiny_llama

    tmp = Path(tempfile.mkdtemp())
    dep = make_deployment(tmp / "dep", save_tiny_bert(tmp / "bert"), save_tiny_llama(tmp / "llama"))
    engine = InferenceEngine(InferenceConfig(), DbModelResolver(dep.settings))
    app = create_inference_app(dep.settings, engine=engine)
    prompt = "word " * (3 * 1024 * 1024 // 5)
    body = {"model": dep.model_ids["lm"], "prompt": prompt, "max_tokens": 2}
    headers = {"Authorization": f"Bearer {dep.keys['alice']}"}
    real_run_cpu = inference_routes.run_cpu

    async def on_loop(_settings, fn, *args):  # what the route did before
        return fn(*args)

    with ServerThread(app) as srv:
        base = srv.base_url.removesuffix("/v1")
        httpx.post(srv.base_url + "/completions", json={**body, "prompt": "hi"}, headers=headers)
        for label, runner in (
            ("on the event loop (before)", on_loop),
            ("off it (now)", real_run_cpu),
        ):
            inference_routes.run_cpu = runner
            done = threading.Event()
            took: dict[str, float] = {}

            def big(done: threading.Event = done, took: dict[str, float] = took) -> None:
                t0 = time.monotonic()
                httpx.post(srv.base_url + "/completions", json=body, headers=headers, timeout=300)
                took["s"] = time.monotonic() - t0
                done.set()

            t = threading.Thread(target=big)
            t.start()
            lat = []
            with httpx.Client(timeout=300) as c:
                while not done.is_set():
                    t0 = time.monotonic()
                    c.get(base + "/healthz")
                    lat.append(time.monotonic() - t0)
                    time.sleep(0.01)
            t.join()
            lat.sort()
            p99 = lat[max(0, int(len(lat) * 0.99) - 1)]
            print(
                f"/health while a 3 MB prompt is tokenized, {label}: max {max(lat) * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms over {len(lat)} polls (prompt request {took['s']:.2f} s)"
            )
        inference_routes.run_cpu = real_run_cpu


# ---------------------------------------------------------------- 3. flood


def bench_flood(quick: bool) -> None:
    import httpx

    from api.app import create_app
    from api.auth import create_api_key
    from api.db import make_sessionmaker, upgrade
    from api.settings import Settings
    from tests.support.inference import ServerThread

    seconds = 4.0 if quick else 10.0

    def run(rate_limit: int, flood: bool) -> tuple[list[float], dict[int, int]]:
        tmp = Path(tempfile.mkdtemp())
        s = Settings(data_dir=tmp, rate_limit_per_minute=rate_limit, auth_cache_seconds=5)
        upgrade(s)
        with make_sessionmaker(s)() as db:
            ka, kb = create_api_key(db, "flooder"), create_api_key(db, "victim")
        app = create_app(s, enqueue=lambda *_: None)
        codes: dict[int, int] = {}
        with ServerThread(app) as srv:
            stop = threading.Event()

            async def flooder() -> None:
                async with httpx.AsyncClient(
                    timeout=30, headers={"Authorization": f"Bearer {ka}"}
                ) as c:

                    async def one() -> None:
                        while not stop.is_set():
                            r = await c.get(srv.base_url + "/files")
                            codes[r.status_code] = codes.get(r.status_code, 0) + 1

                    await asyncio.gather(*(one() for _ in range(16)))

            th = threading.Thread(target=lambda: asyncio.run(flooder())) if flood else None
            if th:
                th.start()
                time.sleep(0.5)
            lat = []
            with httpx.Client(timeout=30, headers={"Authorization": f"Bearer {kb}"}) as c:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    r = c.get(srv.base_url + "/files")
                    assert r.status_code == 200, r.text
                    lat.append(time.monotonic() - t0)
                    time.sleep(0.02)
            stop.set()
            if th:
                th.join()
        return lat, codes

    def pct(lat: list[float], q: float) -> float:
        lat = sorted(lat)
        return lat[max(0, int(len(lat) * q) - 1)] * 1000

    alone, _ = run(600, flood=False)
    limited, codes_on = run(600, flood=True)
    unlimited, codes_off = run(0, flood=True)
    for label, lat, codes in (
        ("alone", alone, {}),
        ("A flooding, limits on (A at 600/min)", limited, codes_on),
        ("A flooding, limits off", unlimited, codes_off),
    ):
        print(
            f"tenant B GET /v1/files, {label}: p50 {statistics.median(lat) * 1000:.1f} ms, "
            f"p99 {pct(lat, 0.99):.1f} ms ({len(lat)} requests)"
            + (f"; A's answers {dict(sorted(codes.items()))}" if codes else "")
        )
    print(
        f"tenant B p99 ratio flood/alone: limits on {pct(limited, 0.99) / pct(alone, 0.99):.2f}x, "
        f"limits off {pct(unlimited, 0.99) / pct(alone, 0.99):.2f}x"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="1,2,3")
    args = ap.parse_args()
    only = set(args.only.split(","))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"maxrss unit KiB ({resource.getrusage(resource.RUSAGE_SELF).ru_maxrss} now)")  # fmt: skip
    if "1" in only:
        bench_validation(args.quick)
    if "2" in only:
        bench_health()
    if "3" in only:
        bench_flood(args.quick)


if __name__ == "__main__":
    main()
