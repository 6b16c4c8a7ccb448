"""The ``finegates`` command: one parser whose ``--help`` lists every command.

It is composed here, at the top of the dependency order (core <- api <- worker), because
only this layer may know every command: the engine's (``core.cli.register``: train,
prune, export, bench), the API's (``api.cli.register``: api, keys, db, models,
serve-inference) and the worker's own below (worker, serve). Registering only declares
arguments; each handler imports its stack when it runs, so ``finegates train`` never
loads fastapi, sqlalchemy or celery.

  serve   the API and one real Celery worker process, embedded (SQLite + SQL broker)
  worker  a Celery worker for production (Redis broker, Postgres)
  cleanup the retention sweep (run directories of ended jobs, cancelled artifacts)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
from typing import Any

from api import cli as api_cli
from api.cli import LOCAL_KEY_FILE, add_data_dir_arg, apply_data_dir, ensure_local_key, upgrade_db
from core import cli as core_cli


def _auto_queues() -> str:
    try:
        import torch

        return "gpu,cpu" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


class _DropLoadReport(logging.Filter):
    """transformers' per-load table: a job's base model always gets a new task head, so
    the table says nothing a user can act on; real load errors still raise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _quiet_start() -> None:
    """No start-up warnings a user cannot act on. Celery warns about running as root
    because a pickle message could run code; this service's Celery accepts JSON only
    (api/queue.py), which is what the warning asks for."""
    import warnings

    warnings.filterwarnings("ignore", message=r"You're running the worker with superuser")
    logging.getLogger("transformers.modeling_utils").addFilter(_DropLoadReport())


def cmd_worker(args: argparse.Namespace) -> int:
    settings = apply_data_dir(args.data_dir)
    queues = _auto_queues() if args.queues == "auto" else args.queues
    bad = [q for q in queues.split(",") if q not in ("gpu", "cpu")]
    if bad:
        print(f"error: --queues: unknown queue(s) {bad}; use gpu, cpu or auto", file=sys.stderr)
        return 2
    if args.preload:
        # Warm start: the first job should not wait for torch/transformers to import.
        import core.train  # noqa: F401

    from api.queue import broker_url_for
    from worker.celery_app import get_app

    _quiet_start()
    app = get_app(settings)
    broker = broker_url_for(settings)
    shown = broker.split("@")[-1] if "@" in broker else broker
    print(f"finegates worker: queues={queues} broker={shown}", flush=True)
    argv = [
        "worker",
        "--queues",
        queues,
        "--loglevel",
        args.loglevel,
        "--without-gossip",
        "--without-mingle",
        "--pool",
        "solo",
        "--concurrency",
        "1",
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


# --- serve ------------------------------------------------------------------------------


def _set_pdeathsig() -> None:
    """Linux: the worker gets SIGTERM if `finegates serve` dies without cleaning up."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class WorkerSupervisor:
    """Runs one worker process and restarts it if it dies while serving.

    A restart is how a crashed embedded worker gets its job back: the new worker's
    reaper finds the stale heartbeat and requeues the job from its last checkpoint.
    """

    def __init__(self, cmd: list[str], env: dict[str, str], shutdown_timeout: float):
        self.cmd = cmd
        self.env = env
        self.shutdown_timeout = shutdown_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)

    def _spawn(self) -> None:
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, start_new_session=True, preexec_fn=_set_pdeathsig
        )

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self.stopping.is_set():
            proc = self.proc
            if proc is not None and proc.poll() is not None and not self.stopping.is_set():
                print(
                    f"finegates serve: worker exited with code {proc.returncode}; "
                    f"restarting in {backoff:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
                if self.stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
                self._spawn()
            elif proc is not None and proc.poll() is None:
                backoff = max(1.0, backoff * 0.9)
            self.stopping.wait(0.5)

    def stop(self) -> None:
        """Warm shutdown: the running job checkpoints and goes back to the queue."""
        self.stopping.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.shutdown_timeout)
        except subprocess.TimeoutExpired:
            print(
                "finegates serve: worker did not stop in time; killing it "
                "(its job resumes from the last checkpoint on the next start)",
                file=sys.stderr,
            )
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def cmd_serve(args: argparse.Namespace) -> int:
    settings = apply_data_dir(args.data_dir)
    settings.data_path.mkdir(parents=True, exist_ok=True)
    upgrade_db(settings)
    key = ensure_local_key(settings)
    print(f"FineGates data directory: {settings.data_path}", flush=True)
    if key is not None:
        print(
            "Created the local API key (also saved to "
            f"{settings.data_path / LOCAL_KEY_FILE}):\n  {key}",
            flush=True,
        )
    else:
        kf = settings.data_path / LOCAL_KEY_FILE
        hint = f" (the first one is in {kf})" if kf.exists() else ""
        print(f"Using existing API keys{hint}; `finegates keys create` makes more.", flush=True)

    supervisor: WorkerSupervisor | None = None
    if not args.no_worker:
        env = dict(os.environ)
        env["FINEGATES_DATA_DIR"] = str(settings.data_path)
        cmd = [sys.executable, "-m", "worker.cli", "worker", "--queues", "gpu,cpu"]
        cmd += ["--loglevel", args.loglevel, "--hostname", f"embedded-{os.getpid()}@%h"]
        supervisor = WorkerSupervisor(cmd, env, args.shutdown_timeout)
        supervisor.start()

    import uvicorn

    print(f"API on http://{args.host}:{args.port}/v1 (OpenAPI at /docs)", flush=True)
    try:
        uvicorn.run(
            "api.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            log_level=args.loglevel.lower(),
            timeout_graceful_shutdown=5,
        )
    finally:
        if supervisor is not None:
            print("finegates serve: stopping the worker...", flush=True)
            supervisor.stop()
    return 0


def _register(subparsers: Any) -> None:
    """Add serve and worker to ``subparsers``."""
    sp = subparsers.add_parser("serve", help="run the API and one worker (embedded default)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    add_data_dir_arg(sp)
    sp.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    sp.add_argument("--loglevel", default="INFO")
    sp.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds the worker gets to checkpoint its job on Ctrl-C before it is killed",
    )
    sp.set_defaults(func=cmd_serve)

    sp = subparsers.add_parser("worker", help="run a Celery worker (production)")
    sp.add_argument(
        "--queues",
        default="auto",
        help="comma-separated queues: gpu, cpu; auto = gpu,cpu with CUDA, else cpu",
    )
    sp.add_argument("--loglevel", default="INFO")
    sp.add_argument("--hostname", default=None, help="Celery node name (default: celery@host)")
    sp.add_argument(
        "--no-preload",
        dest="preload",
        action="store_false",
        help="do not import torch/transformers before taking jobs",
    )
    add_data_dir_arg(sp)
    sp.set_defaults(func=cmd_worker)

    sp = subparsers.add_parser(
        "cleanup", help="delete run directories past FINEGATES_RUN_RETENTION_HOURS"
    )
    add_data_dir_arg(sp)
    sp.set_defaults(func=cmd_cleanup)


def cmd_cleanup(args: argparse.Namespace) -> int:
    """The retention sweep once (the worker also runs it hourly)."""
    settings = apply_data_dir(args.data_dir)
    from api.db.session import make_sessionmaker
    from worker.retention import sweep

    removed = sweep(settings, make_sessionmaker(settings))
    for name in removed:
        print(f"removed {name}")
    print(f"{len(removed)} folder(s) removed (retention {settings.run_retention_hours:g} h)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="finegates",
        description=(
            "FineGates: hosted finetuning that compresses while it adapts. "
            "`finegates COMMAND --help` describes each command."
        ),
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    core_cli.register(sub)
    _register(sub)
    api_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return core_cli.run(args)
    except Exception as exc:  # a refused configuration: one clear message, no traceback
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            print(f"error: invalid configuration: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
