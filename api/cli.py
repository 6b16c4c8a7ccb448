"""The service commands of ``finegates`` that need only the API: api, keys, db, models,
serve-inference, registered by ``register(subparsers)``.

The ``finegates`` root (worker/cli.py) composes these with the engine commands
(core/cli.py) and the worker's own (worker, serve): the API may not import the worker.
Why lazy imports everywhere: ``finegates train`` must not pay for (or need) fastapi,
sqlalchemy or celery, and ``finegates keys create`` must not import torch.

  api              the API alone (production: migrations and workers run separately)
  keys create      a tenant's API key (the key alone on the last line of output)
  keys list|revoke|rotate   a tenant's keys by id; revoke/rotate take effect within
                   the auth cache time (FINEGATES_AUTH_CACHE_SECONDS, default 5 s)
  tenants update   a tenant's limits (requests per minute, active jobs, storage, ...)
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


def _cli_session(args: argparse.Namespace) -> Any:
    settings = apply_data_dir(args.data_dir)
    if settings.is_sqlite:
        upgrade_db(settings)
    from api.db.session import make_sessionmaker

    return settings, make_sessionmaker(settings)()


def _tenant_named(session: Any, name: str) -> Any:
    from sqlalchemy import select

    from api.db.models import Tenant

    return session.execute(select(Tenant).where(Tenant.name == name)).scalar_one_or_none()


def cmd_keys_list(args: argparse.Namespace) -> int:
    """One line per key, its id first; never the secret (only its public prefix)."""
    from sqlalchemy import select

    from api.db.models import ApiKey

    settings, s = _cli_session(args)
    with s:
        tenant = _tenant_named(s, args.tenant)
        if tenant is None:
            print(f"error: no tenant named '{args.tenant}'", file=sys.stderr)
            return 2
        keys = s.execute(
            select(ApiKey).where(ApiKey.tenant_id == tenant.id).order_by(ApiKey.created_at)
        ).scalars()
        for k in keys:
            state = f"revoked {k.revoked_at:%Y-%m-%dT%H:%M:%SZ}" if k.revoked_at else "active"
            print(
                f"{k.id}  {k.prefix}...  {state}  created {k.created_at:%Y-%m-%dT%H:%M:%SZ}"
                f"  {k.name or ''}".rstrip()
            )
    return 0


def _revoke(s: Any, key_id: str) -> Any:
    from sqlalchemy import select

    from api.db.models import ApiKey, utcnow

    key = s.execute(select(ApiKey).where(ApiKey.id == key_id)).scalar_one_or_none()
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
    return key


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    settings, s = _cli_session(args)
    with s:
        key = _revoke(s, args.key_id)
        if key is None:
            print(f"error: no key with id '{args.key_id}'", file=sys.stderr)
            return 2
        s.commit()
    print(
        f"revoked {args.key_id}; running API processes refuse it within "
        f"{settings.auth_cache_seconds:g} s (FINEGATES_AUTH_CACHE_SECONDS)"
    )
    return 0


def cmd_keys_rotate(args: argparse.Namespace) -> int:
    """A new key for the same tenant and name; the old one is revoked (the new key alone
    on the last line, shown once)."""
    from api.auth import create_api_key
    from api.db.models import Tenant

    settings, s = _cli_session(args)
    with s:
        old = _revoke(s, args.key_id)
        if old is None:
            print(f"error: no key with id '{args.key_id}'", file=sys.stderr)
            return 2
        tenant = s.get(Tenant, old.tenant_id)
        key = create_api_key(s, tenant.name, old.name)  # commits the revocation too
    print(
        f"revoked {args.key_id} (refused within {settings.auth_cache_seconds:g} s); new key "
        f"for tenant '{tenant.name}' (shown once; store it now):"
    )
    print(key)
    return 0


_LIMIT_FLAGS = (
    ("requests_per_minute", "--requests-per-minute"),
    ("max_active_jobs", "--max-active-jobs"),
    ("max_storage_bytes", "--max-storage-bytes"),
    ("max_files", "--max-files"),
    ("max_concurrent_inference", "--max-concurrent-inference"),
)


def _limit_value(text: str) -> int | None:
    if text == "default":
        return None
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (or 'default')")
    return value


def cmd_tenants_update(args: argparse.Namespace) -> int:
    """Per-tenant overrides of the settings' limits ('default' clears one); they take
    effect within the auth cache time."""
    from api.limits import TenantLimits

    settings, s = _cli_session(args)
    with s:
        tenant = _tenant_named(s, args.name)
        if tenant is None:
            print(f"error: no tenant named '{args.name}'", file=sys.stderr)
            return 2
        for column, _flag in _LIMIT_FLAGS:
            value = getattr(args, column)
            if value is not _UNSET:
                setattr(tenant, column, value)
        s.commit()
        limits = TenantLimits.resolve(settings, tenant)
        for column, flag in _LIMIT_FLAGS:
            own = getattr(tenant, column)
            print(f"{flag[2:]}: {getattr(limits, column)}{'' if own is not None else ' (default)'}")
    return 0


_UNSET: Any = object()


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
    """Add api, keys, tenants, db, models and serve-inference to ``subparsers``."""
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
    kl = ksub.add_parser("list", help="a tenant's keys, one a line (id first; never the key)")
    kl.add_argument("--tenant", required=True, help="tenant name")
    add_data_dir_arg(kl)
    kl.set_defaults(func=cmd_keys_list)
    kr = ksub.add_parser("revoke", help="revoke a key (refused within the auth cache time)")
    kr.add_argument("key_id", help="the key's id (key-..., from `keys list`)")
    add_data_dir_arg(kr)
    kr.set_defaults(func=cmd_keys_revoke)
    kt = ksub.add_parser("rotate", help="replace a key: a new one, the old one revoked")
    kt.add_argument("key_id", help="the key's id (key-..., from `keys list`)")
    add_data_dir_arg(kt)
    kt.set_defaults(func=cmd_keys_rotate)

    sp = subparsers.add_parser("tenants", help="tenants and their limits")
    tsub = sp.add_subparsers(dest="tenants_command", metavar="COMMAND", required=True)
    tu = tsub.add_parser("update", help="set a tenant's limits ('default' clears one)")
    tu.add_argument("name", help="tenant name")
    for column, flag in _LIMIT_FLAGS:
        tu.add_argument(flag, dest=column, type=_limit_value, default=_UNSET, metavar="N")
    add_data_dir_arg(tu)
    tu.set_defaults(func=cmd_tenants_update)

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
