"""A standalone inference app for ``finegates serve-inference``.

Why a separate process at all: in the embedded default the API process also serves
inference, which is simplest; in production, model memory and CPU/GPU time of inference
should not compete with the job API (and its 100 polling clients), and inference replicas
scale separately. This app mounts the SAME inference router, the same Bearer-key auth
(same database), the same OpenAI error shape and a read-only /v1/models, so clients
point at it without any change.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI


def create_inference_app(settings: Any = None, engine: Any = None) -> FastAPI:
    """``engine``: a prebuilt InferenceEngine (tests, benchmarks); else built on first use."""
    from api.auth import AuthCache
    from api.db.session import make_engine, make_sessionmaker
    from api.errors import install_error_handlers
    from api.routes import inference, models
    from api.storage import LocalStorage

    if settings is None:
        from api.settings import get_settings

        settings = get_settings()
    db_engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        eng = getattr(app.state, "inference", None)
        if eng is not None:
            eng.close()
        db_engine.dispose()

    app = FastAPI(
        title="FineGates inference",
        version="1",
        description="OpenAI-compatible completions/chat and /v1/classify for FineGates models.",
        lifespan=lifespan,
    )
    # the same app state the API's create_app sets, so its dependencies (auth) work here
    app.state.settings = settings
    app.state.engine = db_engine
    app.state.sessionmaker = make_sessionmaker(db_engine)
    app.state.storage = LocalStorage(settings.storage_dir)
    app.state.auth_cache = AuthCache(settings.auth_cache_seconds)
    app.state.shutdown_hooks = []
    if engine is not None:
        app.state.inference = engine
    install_error_handlers(app)
    from fastapi import APIRouter

    from api.limits import InferenceSlots, RateLimiter, RequestGuard, declare_error_responses

    app.state.rate_limiter = RateLimiter(settings)
    app.state.inference_slots = InferenceSlots()
    app.add_middleware(RequestGuard, settings=settings)
    declare_error_responses(app)
    app.include_router(inference.router, prefix="/v1")
    # the models routes too, so openai's client.models.list() works against this process;
    # read-only: this app mutates nothing (DELETE /v1/models/... lives on the API only)
    read_only = APIRouter()
    read_only.routes.extend(
        r for r in models.router.routes if set(getattr(r, "methods", ()) or ()) <= {"GET", "HEAD"}
    )
    app.include_router(read_only, prefix="/v1")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
