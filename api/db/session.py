"""Engines and sessions built from Settings (no fastapi here: the worker uses it too).

Why per-dialect setup: SQLite (embedded default) is shared by the API threads and a worker
process, so it gets WAL and a busy timeout; PostgreSQL gets a sized pool because 100 polling
clients each hold a connection for a moment.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from api.settings import Settings


def make_engine(settings: Settings) -> Engine:
    url = make_url(settings.db_url)
    kwargs: dict[str, Any] = {"echo": settings.db_echo, "future": True}
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    kwargs.update(
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
        pool_timeout=settings.db_pool_timeout_s,
        pool_pre_ping=settings.db_pool_pre_ping,
        pool_recycle=1800,
    )
    if url.get_backend_name() == "postgresql":
        # An unreachable (not refusing) server must fail a request, not hang it.
        kwargs["connect_args"] = {"connect_timeout": 5}
    return create_engine(url, **kwargs)


def make_sessionmaker(settings_or_engine: Settings | Engine) -> sessionmaker[Session]:
    engine = (
        settings_or_engine
        if isinstance(settings_or_engine, Engine)
        else make_engine(settings_or_engine)
    )
    return sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that rolls back on error and always closes (for workers and scripts)."""
    session = factory()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
