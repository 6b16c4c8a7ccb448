"""Worker test fixtures: a migrated database (SQLite and PostgreSQL, from tests/conftest.py)
and worker settings with a short heartbeat timeout and a retry limit of 2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.db import make_sessionmaker
from api.settings import Settings
from tests.support.db import wipe


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        heartbeat_timeout_s=30,
        job_max_attempts=2,
    )


@pytest.fixture
def sessions(migrated_engine: Engine, settings: Settings) -> Iterator[sessionmaker[Session]]:
    yield make_sessionmaker(migrated_engine)
    wipe(migrated_engine)
