"""API test fixtures: every test runs on SQLite AND on PostgreSQL (``db_url`` and
``migrated_engine`` come from tests/conftest.py; see tests/support/db.py). Rows are wiped
after each test; tests create their own tenants anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine

from api.auth import create_api_key
from api.db import make_sessionmaker
from api.settings import Settings
from tests.support.db import wipe


class EnqueueRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail: Exception | None = None

    def __call__(self, job_id: str, queue: str) -> None:
        if self.fail is not None:
            raise self.fail
        self.calls.append((job_id, queue))


@pytest.fixture
def settings(tmp_path: Path, db_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=db_url,
        max_upload_bytes=64 * 1024,
        auth_cache_seconds=0,
    )


@pytest.fixture
def enqueued() -> EnqueueRecorder:
    return EnqueueRecorder()


@pytest.fixture
def app(settings: Settings, migrated_engine: Engine, enqueued: EnqueueRecorder) -> Iterator[Any]:
    from api.app import create_app

    application = create_app(settings, engine=migrated_engine, enqueue=enqueued)
    application.state.owns_engine = False
    yield application
    wipe(migrated_engine)


@pytest.fixture
def client(app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


@pytest.fixture
def sessions(migrated_engine: Engine):
    return make_sessionmaker(migrated_engine)


@pytest.fixture
def make_headers(sessions):
    """make_headers("tenant-a") -> {"Authorization": "Bearer fg-..."} (new key each call)."""

    def _make(tenant: str = "tenant-a") -> dict[str, str]:
        with sessions() as s:
            key = create_api_key(s, tenant)
        return {"Authorization": f"Bearer {key}"}

    return _make
