"""Migrations: `upgrade head` on an empty database builds exactly the ORM schema."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api.db import Base, make_engine, upgrade
from api.settings import Settings


def test_upgrade_matches_models(db_url, migrated_engine):
    # migrated_engine ran api.db.upgrade() on a fresh database for this session
    with migrated_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
        tables = set(inspect(conn).get_table_names())
        version = ctx.get_current_revision()
    assert diff == []
    assert {
        "tenants",
        "api_keys",
        "files",
        "jobs",
        "job_events",
        "job_metrics",
        "checkpoints",
        "models",
    } <= tables
    assert version is not None


def test_upgrade_is_idempotent_and_creates_sqlite_file(tmp_path):
    s = Settings(data_dir=tmp_path / "fresh")
    upgrade(s)
    upgrade(s)  # second run is a no-op
    from alembic import command

    from api.db import alembic_config

    command.downgrade(alembic_config(s), "base")
    eng = make_engine(s)
    try:
        assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
    finally:
        eng.dispose()
    upgrade(s)
    assert (tmp_path / "fresh" / "finegates.db").is_file()
    eng = make_engine(s)
    try:
        assert "jobs" in inspect(eng).get_table_names()
    finally:
        eng.dispose()


def test_settings_production_refuses_defaults(monkeypatch):
    with pytest.raises(ValueError, match="SQLite"):
        Settings(mode="production", secret_key="x" * 40, broker_url="redis://r:6379/0")
    with pytest.raises(ValueError, match="password"):
        Settings(
            mode="production",
            database_url="postgresql+psycopg://postgres:postgres@db/fg",
            broker_url="redis://r:6379/0",
            secret_key="x" * 40,
        )
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Settings(
            mode="production",
            database_url="postgresql+psycopg://fg:s3cr3t-Long@db/fg",
            broker_url="redis://r:6379/0",
            secret_key="change-me",
        )
    ok = Settings(
        mode="production",
        database_url="postgresql+psycopg://fg:s3cr3t-Long@db/fg",
        broker_url="redis://r:6379/0",
        secret_key="k" * 40,
    )
    assert ok.db_url.startswith("postgresql")
    monkeypatch.setenv("FINEGATES_DATA_DIR", "/tmp/fg-env-dir")
    monkeypatch.setenv("FINEGATES_MAX_UPLOAD_BYTES", "1234")
    env = Settings()
    assert str(env.data_path) == "/tmp/fg-env-dir" and env.max_upload_bytes == 1234
    assert env.db_url == "sqlite:////tmp/fg-env-dir/finegates.db"
