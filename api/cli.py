"""The service commands of ``finegates`` that need only the API: api, keys, db, models,
serve-inference, registered by ``register(subparsers)``.

The ``finegates`` root (worker/cli.py) composes these with the engine commands
(core/cli.py) and the worker's own (worker, serve): the API may not import the worker.
Why lazy imports everywhere: ``finegates train`` must not pay for (or need) fastapi,
sqlalchemy or celery, and ``finegates keys create`` must not import torch.

  api              the API alone (production: migrations and workers run separately)
  keys create      a tenant's API key (the key alone on the last line of output)
  db upgrade       Alembic migrations (the one-shot ``migrate`` step in production)
  models register  give a local Hugging Face folder a model id jobs can use
  serve-inference  the inference API alone
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

LOCAL_TENANT = "local"
LOCAL_KEY_FILE = "local-api-key.txt"


def add_data_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir",
        default=None,
        help="data directory (default: $FINEGATES_DATA_DIR or ./.data)",
    )


def apply_data_dir(data_dir: str | None) -> Any:
    """``--data-dir`` wins over FINEGATES_DATA_DIR (children inherit it through the env);
    returns the settings read afresh from the environment."""
    if data_dir:
        os.environ["FINEGATES_DATA_DIR"] = str(Path(data_dir).expanduser().resolve())
    from api.settings import get_settings

    get_settings.cache_clear()
    return get_settings()


def upgrade_db(settings: Any) -> None:
    from api.db import upgrade

    upgrade(settings)


# --- keys / db --------------------------------------------------------------------------


def cmd_keys_create(args: argparse.Namespace) -> int:
    settings = apply_data_dir(args.data_dir)
    if settings.is_sqlite:
        upgrade_db(settings)  # a fresh embedded data dir has no tables yet
    from api.auth import create_api_key
    from api.db.session import make_sessionmaker, session_scope

    with session_scope(make_sessionmaker(settings)) as s:
        key = create_api_key(s, args.tenant, args.name)
    print(f"Created an API key for tenant '{args.tenant}' (shown once; store it now):")
    print(key)
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    settings = apply_data_dir(args.data_dir)
    upgrade_db(settings)
    where = settings.db_url.split("@")[-1] if "@" in settings.db_url else settings.db_url
    print(f"database is at the latest migration ({where})")
    return 0


def cmd_models_register(args: argparse.Namespace) -> int:
    settings = apply_data_dir(args.data_dir)
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


def cmd_api(args: argparse.Namespace) -> int:
    """Production API process: no migrations (the one-shot `db upgrade` does them), no
    local key, no worker (they run as their own services)."""
    apply_data_dir(args.data_dir)  # refuses a bad production configuration before uvicorn
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
    apply_data_dir(args.data_dir)
    import uvicorn

    uvicorn.run(
        "api.inference.app:create_inference_app",
        factory=True,
        host=args.host,
        port=args.port,
        log_level=args.loglevel.lower(),
    )
    return 0


# --- parsers ----------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add api, keys, db, models and serve-inference to ``subparsers``."""
    sp = subparsers.add_parser("api", help="run the API only (production; see docker-compose.yml)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8000)
    sp.add_argument("--workers", type=int, default=1, help="uvicorn worker processes")
    sp.add_argument("--loglevel", default="INFO")
    add_data_dir_arg(sp)
    sp.set_defaults(func=cmd_api)

    sp = subparsers.add_parser("keys", help="API keys")
    ksub = sp.add_subparsers(dest="keys_command", metavar="COMMAND", required=True)
    kc = ksub.add_parser("create", help="create a key (and the tenant if new)")
    kc.add_argument("--tenant", required=True, help="tenant name")
    kc.add_argument("--name", default=None, help="a label for the key")
    add_data_dir_arg(kc)
    kc.set_defaults(func=cmd_keys_create)

    sp = subparsers.add_parser("db", help="database")
    dsub = sp.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    du = dsub.add_parser("upgrade", help="apply migrations (alembic upgrade head)")
    add_data_dir_arg(du)
    du.set_defaults(func=cmd_db_upgrade)

    sp = subparsers.add_parser("models", help="the local model registry")
    msub = sp.add_subparsers(dest="models_command", metavar="COMMAND", required=True)
    mr = msub.add_parser("register", help="make a local Hugging Face folder usable by jobs")
    mr.add_argument("model_id", help="the id jobs will use, e.g. my-bert")
    mr.add_argument("path", help="a folder with config.json, safetensors weights, tokenizer")
    add_data_dir_arg(mr)
    mr.set_defaults(func=cmd_models_register)
    from api import client_cli  # files, jobs, models download: the REST client

    client_cli.register(subparsers, msub)

    sp = subparsers.add_parser("serve-inference", help="run the inference API alone")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8001)
    sp.add_argument("--loglevel", default="INFO")
    add_data_dir_arg(sp)
    sp.set_defaults(func=cmd_serve_inference)
