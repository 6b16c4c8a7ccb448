"""The ``finegates`` command: service commands here, engine commands in core/cli.py.

Why lazy imports everywhere: ``finegates train`` must not pay for (or need) fastapi,
sqlalchemy or celery, and ``finegates keys create`` must not import torch.

Service commands:
  serve            API + one real Celery worker process, embedded (SQLite + SQL broker)
  api              the API alone (production: migrations and workers run separately)
  worker           a Celery worker for production (Redis broker, Postgres)
  keys create      a tenant's API key (the key alone on the last line of output)
  db upgrade       Alembic migrations (the one-shot ``migrate`` step in production)
  models register  give a local Hugging Face folder a model id jobs can use
  serve-inference  the inference API alone (helper E's app)
Everything else (train, prune, export, bench) goes to ``core.cli.main``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

SERVICE_COMMANDS = ("serve", "api", "worker", "keys", "db", "models", "serve-inference")
LOCAL_TENANT = "local"
LOCAL_KEY_FILE = "local-api-key.txt"


def _apply_data_dir(data_dir: str | None) -> None:
    """``--data-dir`` wins over FINEGATES_DATA_DIR; children inherit it through the env."""
    if data_dir:
        os.environ["FINEGATES_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    from api.settings import get_settings

    get_settings.cache_clear()


def _settings() -> Any:
    from api.settings import get_settings

    return get_settings()


def _upgrade(settings: Any) -> None:
    from api.db import upgrade

    upgrade(settings)


# --- keys / db --------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    settings = _settings()
    if settings.is_sqlite:
        _upgrade(settings)  # a fresh embedded data dir has no tables yet
    from api.auth import create_api_key
    from api.db.session import make_sessionmaker, session_scope

    with session_scope(make_sessionmaker(settings)) as s:
        key = create_api_key(s, args.tenant, args.name)
    print(f"Created an API key for tenant '{args.tenant}' (shown once; store it now):")
    print(key)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    settings = _settings()
    _upgrade(settings)
    where = settings.db_url.split("@")[-1] if "@" in settings.db_url else settings.db_url
    print(f"database is at the latest migration ({where})")
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    settings = _settings()
    from core.catalog import register_model
    from core.errors import FineGatesError

    try:
        folder = register_model(args.model_id, args.path, settings.data_path)
    except FineGatesError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    print(f"registered model '{args.model_id}' -> {folder}")
    return 0


def ensure_local_key(settings: Any) -> str | None:
    """First start of the embedded mode: a 'local' tenant and key, printed once.

    Returns the new key, or None when any key already exists. The key is also written
    (mode 0600) under the data directory so a later shell can find it.
    """
    from sqlalchemy import func, select

    from api.auth import create_api_key
    from api.db.models import ApiKey
    from api.db.session import make_sessionmaker, session_scope

    with session_scope(make_sessionmaker(settings)) as s:
        if s.execute(select(func.count()).select_from(ApiKey)).scalar_one() > 0:
            return None
        key = create_api_key(s, LOCAL_TENANT, "local (created by finegates serve)")
    path = settings.data_path / LOCAL_KEY_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key


# --- worker -----------------------------------------------------------------------------


def _auto_queues() -> str:
    try:
        import torch

        return "gpu,cpu" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def cmd_worker(args: argparse.Namespace) -> int:
    _apply_data_dir(args.data_dir)
    settings = _settings()
    queues = _auto_queues() if args.queues == "auto" else args.queues
    bad = [q for q in queues.split(",") if q not in ("gpu", "cpu")]
    if bad:
        print(f"error: --queues: unknown queue(s) {bad}; use gpu, cpu or auto", file=sys.stderr)
        return 2
    if args.preload:
        # Warm start: the first job should not wait for torch/transformers to import.
        import core.train  # noqa: F401

    from worker.celery_app import broker_url_for, get_app

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
        self.restarts = 0
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
                self.restarts += 1
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
    _apply_data_dir(args.data_dir)
    settings = _settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    _upgrade(settings)
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
        cmd = [sys.executable, "-m", "api.cli", "worker", "--queues", "gpu,cpu"]
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


def cmd_api(args: argparse.Namespace) -> int:
    """Production API process: no migrations (the one-shot `db upgrade` does them), no
    local key, no worker (they run as their own services)."""
    _apply_data_dir(args.data_dir)
    _settings()  # refuse a bad production configuration before uvicorn starts
    import uvicorn

    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.loglevel.lower(),
        proxy_headers=True,
        timeout_graceful_shutdown=10,
    )
    return 0


def cmd_serve_inference(args: argparse.Namespace) -> int:
    import importlib.util

    _apply_data_dir(args.data_dir)
    if importlib.util.find_spec("api.inference.app") is None:
        print("error: the inference server is not part of this build", file=sys.stderr)
        return 2
    import uvicorn

    uvicorn.run(
        "api.inference.app:create_inference_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.loglevel.lower(),
    )
    return 0


# --- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="finegates",
        description=(
            "FineGates: hosted finetuning that compresses while it adapts. Service commands: "
            "serve, api, worker, keys, db, models, serve-inference. Engine commands (train, prune, export, "
            "bench): see `finegates train --help`."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True)

    def data_dir(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--data-dir",
            default=None,
            help="data directory (default: $FINEGATES_DATA_DIR or ./.data)",
        )

    sp = sub.add_parser("serve", help="run the API and one worker (embedded default)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    data_dir(sp)
    sp.add_argument("--no-worker", action="store_true", help="API only (workers run elsewhere)")
    sp.add_argument("--loglevel", default="INFO")
    sp.add_argument(
        "--shutdown-timeout",
        type=float,
        default=60.0,
        help="seconds the worker gets to checkpoint its job on Ctrl-C before it is killed",
    )
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("api", help="run the API only (production; see docker-compose.yml)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    sp.add_argument("--loglevel", default="INFO")
    data_dir(sp)
    sp.set_defaults(func=cmd_api)

    sp = sub.add_parser("worker", help="run a Celery worker (production)")
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
    data_dir(sp)
    sp.set_defaults(func=cmd_worker)

    sp = sub.add_parser("keys", help="API keys")
    ksub = sp.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create a key (and the tenant if new)")
    kc.add_argument("--tenant", required=True, help="tenant name")
    kc.add_argument("--name", default=None, help="a label for the key")
    data_dir(kc)
    kc.set_defaults(func=cmd_keys_create)

    sp = sub.add_parser("db", help="database")
    dsub = sp.add_subparsers(dest="db_command", required=True)
    du = dsub.add_parser("upgrade", help="apply migrations (alembic upgrade head)")
    data_dir(du)
    du.set_defaults(func=cmd_db_upgrade)

    sp = sub.add_parser("models", help="the local model registry")
    msub = sp.add_subparsers(dest="models_command", required=True)
    mr = msub.add_parser("register", help="make a local Hugging Face folder usable by jobs")
    mr.add_argument("model_id", help="the id jobs will use, e.g. my-bert")
    mr.add_argument("path", help="a folder with config.json, safetensors weights, tokenizer")
    data_dir(mr)
    mr.set_defaults(func=cmd_models_register)

    sp = sub.add_parser("serve-inference", help="run the inference API alone")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8001)
    sp.add_argument("--loglevel", default="INFO")
    data_dir(sp)
    sp.set_defaults(func=cmd_serve_inference)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in SERVICE_COMMANDS:
        from core.cli import main as engine_main

        return int(engine_main(argv) or 0)
    if first is None and argv and argv[0] not in ("-h", "--help"):
        from core.cli import main as engine_main

        return int(engine_main(argv) or 0)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a refused configuration: one clear message, no traceback
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            print(f"error: invalid configuration: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
