"""Typed dependencies that keep handlers short (full-stack-fastapi-template style).

Ownership lives here, once per object kind: ``OwnedJob``, ``OwnedFile`` and ``ModelDep``
load the object named in the path scoped to the caller's tenant and answer 404 otherwise,
so no handler can forget it; ``load_owned_file`` and ``find_owned_model`` are the same
lookups for ids that arrive in a request body or an inference call. Another tenant's
object answers exactly like one that never existed (no id probing).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import Principal, authenticate, hash_key
from api.db.models import File, FineTunedModel, Job
from api.errors import APIError, not_found
from api.jobstate import queue_position_expr
from api.model_ids import CHECKPOINT_MARK
from api.settings import Settings
from api.storage import LocalStorage

# Why several of these are ``async def`` with no awaits: FastAPI runs every plain ``def``
# dependency in the thread pool. Those without I/O stay on the event loop; the ones that
# touch the database do not. GET /jobs/{id} (the polling route) thus costs two thread hops.


async def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_storage(request: Request) -> LocalStorage:
    return request.app.state.storage


async def get_db(request: Request) -> AsyncIterator[Session]:
    # Creating a Session does no I/O (the connection is taken on first use); closing it
    # returns the connection (a ROLLBACK round trip), so that part runs in a thread.
    session = request.app.state.sessionmaker()
    try:
        yield session
    finally:
        await run_in_threadpool(session.close)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StorageDep = Annotated[LocalStorage, Depends(get_storage)]
SessionDep = Annotated[Session, Depends(get_db)]


def _authenticate_short(sessionmaker: Any, token: str, settings: Any = None) -> Principal | None:
    # Its own short session: the request's session would keep the pooled connection
    # checked out until the response ends, so N slow requests (a classify call waiting in
    # the micro-batcher, an SSE stream) would pin N connections and starve the pool.
    with sessionmaker() as session:
        principal = authenticate(session, token)
        if principal is None or settings is None:
            return principal
        from dataclasses import replace

        from api.limits import limits_for

        return replace(principal, limits=limits_for(session, settings, principal.tenant_id))


async def get_principal(request: Request) -> Principal:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise APIError(
            401,
            "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    cache = request.app.state.auth_cache
    digest = hash_key(token)
    principal = cache.get(digest)
    if principal is None:
        principal = await run_in_threadpool(
            _authenticate_short,
            request.app.state.sessionmaker,
            token,
            getattr(request.app.state, "settings", None),
        )
        if principal is None:
            raise APIError(
                401,
                f"Incorrect API key provided: {token[:6]}...",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        cache.put(digest, principal)
    if principal.limits is not None:
        from api.limits import enforce_rate_limit

        await enforce_rate_limit(request, principal.tenant_id, principal.limits)
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def get_owned_job(
    job_id: Annotated[str, Path(max_length=64)], principal: PrincipalDep, session: SessionDep
) -> Job:
    row = session.execute(
        select(Job, queue_position_expr()).where(
            Job.id == job_id, Job.tenant_id == principal.tenant_id
        )
    ).one_or_none()
    if row is None:
        raise not_found("job", job_id)
    job, position = row
    job._queue_position = position  # read by jobstate.queue_position: no second query
    return job


def load_owned_file(
    session: Session, tenant_id: str, file_id: str, param: str | None = None
) -> File:
    f = session.execute(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if f is None:
        raise not_found("file", file_id, param)
    return f


def get_owned_file(
    file_id: Annotated[str, Path(max_length=64)], principal: PrincipalDep, session: SessionDep
) -> File:
    return load_owned_file(session, principal.tenant_id, file_id)


def find_owned_model(session: Session, model_id: str, tenant_id: str) -> FineTunedModel | None:
    return session.execute(
        select(FineTunedModel).where(
            FineTunedModel.id == model_id, FineTunedModel.tenant_id == tenant_id
        )
    ).scalar_one_or_none()


@dataclass(frozen=True)
class ModelRef:
    """What a model id names for the caller: their finetuned model, else a catalog model."""

    id: str
    finetuned: FineTunedModel | None
    base: Any | None  # core.catalog's entry; shared by every tenant, read-only


def base_models(settings: Settings) -> dict[str, Any]:
    from core.catalog import list_models

    return {m.id: m for m in list_models(settings.data_path, allow_hub=settings.allow_hub)}


def get_model_ref(
    model_id: str, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> ModelRef:
    finetuned = find_owned_model(session, model_id, principal.tenant_id)
    base = None if finetuned is not None else base_models(settings).get(model_id)
    if finetuned is None and base is None:
        err = not_found("model", model_id)
        if CHECKPOINT_MARK in model_id:  # same words for any id: no probing of other tenants
            err.message += "; a checkpoint becomes a model when its job has succeeded"
        raise err
    return ModelRef(model_id, finetuned, base)


OwnedJob = Annotated[Job, Depends(get_owned_job)]
OwnedFile = Annotated[File, Depends(get_owned_file)]
ModelDep = Annotated[ModelRef, Depends(get_model_ref)]
