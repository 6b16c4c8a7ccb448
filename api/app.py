"""The ASGI app factory: ``create_app(settings)`` (uvicorn: ``api.app:create_app --factory``).

Why a factory: tests and ``finegates serve`` build apps with their own settings, engine and
enqueue function; nothing is created at import time.

Enqueue seam: after a job row is committed, the API calls ``enqueue(job_id, queue)``. By
default that is ``api.queue.publish`` on the broker of these settings (the app is built
without touching the broker, so the API-only tests need none). Pass ``enqueue=`` to
override it (tests record calls instead).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI
from sqlalchemy.engine import Engine

from api.auth import AuthCache
from api.db.session import make_engine, make_sessionmaker
from api.errors import install_error_handlers
from api.queue import Publish, publish
from api.settings import Settings, get_settings
from api.storage import LocalStorage
from core import __version__

log = logging.getLogger("finegates.api")


def create_app(
    settings: Settings | None = None,
    *,
    engine: Engine | None = None,
    enqueue: Publish | None = None,
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
        version=__version__,
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
    app.state.enqueue = enqueue or partial(publish, settings=settings)
    hooks: list[Callable[[], Any]] = []
    app.state.shutdown_hooks = hooks
    install_error_handlers(app)
    from api.limits import InferenceSlots, RateLimiter, RequestGuard, declare_error_responses

    app.state.rate_limiter = RateLimiter(settings)
    app.state.inference_slots = InferenceSlots()
    app.add_middleware(RequestGuard, settings=settings)
    declare_error_responses(app)

    from api.routes import files, inference, jobs, models

    app.include_router(files.router, prefix="/v1")
    app.include_router(jobs.router, prefix="/v1")
    app.include_router(inference.router, prefix="/v1")
    from api.routes import dashboard, gates

    app.include_router(gates.router, prefix="/v1")
    app.include_router(dashboard.router)  # the web dashboard at /

    from api.routes import webhooks

    app.include_router(webhooks.router, prefix="/v1")
    # Last: its /models/{model_id:path} routes match any path under /models.
    app.include_router(models.router, prefix="/v1")

    @app.get("/health", tags=["meta"])
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
