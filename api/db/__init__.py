"""Persistence: ORM models, engines/sessions and the migration entry point.

``upgrade(settings)`` is what ``finegates db upgrade`` runs; nothing migrates at import.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from api.db.models import (
    ApiKey,
    Base,
    Checkpoint,
    File,
    FineTunedModel,
    Job,
    JobEvent,
    JobMetric,
    Tenant,
    new_id,
    utcnow,
)
from api.db.session import make_engine, make_sessionmaker, session_scope

if TYPE_CHECKING:
    from alembic.config import Config

    from api.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

__all__ = [
    "ApiKey",
    "Base",
    "Checkpoint",
    "File",
    "FineTunedModel",
    "Job",
    "JobEvent",
    "JobMetric",
    "Tenant",
    "alembic_config",
    "make_engine",
    "make_sessionmaker",
    "new_id",
    "session_scope",
    "upgrade",
    "utcnow",
]


def alembic_config(settings: Settings) -> Config:
    """An Alembic config that points at migrations/ and carries these settings to env.py."""
    from alembic.config import Config

    cfg = Config(str(MIGRATIONS_DIR / "alembic.ini"))
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["settings"] = settings
    return cfg


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Run ``alembic upgrade head`` against ``settings.db_url`` (idempotent)."""
    from alembic import command

    if settings.is_sqlite:
        settings.data_path.mkdir(parents=True, exist_ok=True)
    command.upgrade(alembic_config(settings), revision)
