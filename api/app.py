"""The ASGI app factory: ``create_app(settings)`` (uvicorn: ``api.app:create_app --factory``).

Why a factory: tests and ``finegates serve`` build apps with their own settings, engine and
enqueue function; nothing is created at import time.

Enqueue seam (helper C2, worker/dispatch.py): after a job row is committed, the API calls
``enqueue(job_id, queue)``. By default that is ``worker.dispatch.enqueue_job(job_id,
queue=queue, settings=settings)``, imported lazily so the API-only tests need no broker.
Pass ``enqueue=`` to override it (tests record calls instead).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from api.auth import AuthCache
from api.db.session import make_engine, make_sessionmaker
from api.errors import install_error_handlers
from api.settings import Settings, get_settings
from api.storage import LocalStorage

log = logging.getLogger("finegates.api")

Enqueue = Callable[[str, str], None]


def _default_enqueue(settings: Settings) -> Enqueue:
    def enqueue(job_id: str, queue: str) -> None:
        from worker.dispatch import enqueue_job

        enqueue_job(job_id, queue=queue, settings=settings)

    return enqueue


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    enqueue: Enqueue | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    engine = engine or make_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        import anyio.to_thread

        # Sync handlers run in this pool; polling clients each hold a thread briefly.
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        yield
        for hook in app.state.shutdown_hooks:
            try:
                hook()
            except Exception:  # pragma: no cover - best effort on shutdown
                log.exception("shutdown hook failed")
        if app.state.owns_engine:
            engine.dispose()

    app = FastAPI(
        title="FineGates",
        version=_version(),
        description=(
            "Hosted finetuning that compresses while it adapts. OpenAI-shaped files, "
            "fine-tuning jobs and models under /v1."
        ),
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.owns_engine = True
    app.state.sessionmaker = make_sessionmaker(engine)
    app.state.storage = LocalStorage(settings.storage_dir)
    app.state.auth_cache = AuthCache(settings.auth_cache_seconds)
    app.state.enqueue = enqueue or _default_enqueue(settings)
    hooks: list[Callable[[], Any]] = []
    app.state.shutdown_hooks = hooks
    install_error_handlers(app)

    from api.routes import files, jobs, models

    app.include_router(files.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    # Inference (helper E) before models: its routes are not under /models, but keep the
    # catch-all /models/{id:path} last anyway.
    if importlib.util.find_spec("api.routes.inference") is not None:
        from api.routes import inference

        app.include_router(inference.router, prefix="/v1")
    app.include_router(models.router, prefix="/v1")

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _version() -> str:
    try:
        from core import __version__

        return __version__
    except Exception:  # pragma: no cover
        return "0"
