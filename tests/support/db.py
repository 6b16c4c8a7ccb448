"""Databases for the tests: every database-backed test runs on SQLite AND on PostgreSQL.

PostgreSQL: a fresh database per test session on postgresql+psycopg://postgres@127.0.0.1:5432
(created and dropped here). Unreachable -> the Postgres variant is skipped locally but FAILS
when CI=true. Schema comes from ``alembic upgrade head`` (so every database test also
exercises the migration). Rows are wiped after each test (``wipe``).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy import delete
from sqlalchemy.engine import Engine

from api.db import Base, make_engine, upgrade
from api.settings import Settings

PG_ADMIN = os.environ.get("FINEGATES_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def _pg_create() -> str:
    import psycopg

    name = f"fg_api_{secrets.token_hex(4)}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name


def _pg_drop(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _pg_url(name: str) -> str:
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def db_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('apidb') / 'api.db'}"
        return
    try:
        name = _pg_create()
    except Exception as exc:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"PostgreSQL is required under CI=true but unreachable: {exc}")
        pytest.skip(f"PostgreSQL unreachable ({exc}); skipped locally, fails under CI=true")
    try:
        yield _pg_url(name)
    finally:
        _pg_drop(name)


@pytest.fixture(scope="session")
def migrated_engine(db_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    settings = Settings(data_dir=tmp_path_factory.mktemp("migrate"), database_url=db_url)
    upgrade(settings)
    engine = make_engine(settings)
    yield engine
    engine.dispose()


def wipe(engine: Engine) -> None:
    with engine.begin() as conn:
        for table in reversed(Base.metadata.sorted_tables):
            conn.execute(delete(table))
