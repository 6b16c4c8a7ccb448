"""/v1/fine_tuning/jobs: create (idempotent), list, get, cancel, events, checkpoints, metrics.

Creation validates everything it can before a worker sees the job: the hyperparameters
(through the engine's own ``Hyperparameters.from_dict``, so the API and the worker can
never disagree), the model id against the catalog, the files' owner/task, and only then
commits and enqueues (enqueue AFTER commit, so a worker never reads a missing row).
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import datetime
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Header, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import jobstate, pagination
from api.db.models import Checkpoint, File, Job, JobEvent, JobMetric, new_id, utcnow
from api.deps import (
    OwnedJob,
    PrincipalDep,
    SessionDep,
    SettingsDep,
    StorageDep,
    base_models,
    load_owned_file,
)
from api.errors import APIError, not_found
from api.limits import check_active_jobs, check_job_size, limits_for, tenant_lock
from api.model_ids import checkpoint_model_id
from api.schemas import (
    CheckpointObject,
    CountedPage,
    FineGatesMethod,
    JobCreate,
    JobError,
    JobEventObject,
    JobMethod,
    JobObject,
    JobStatus,
    MetricPoint,
    Page,
    Progress,
    Sparsity,
)
from api.settings import Settings
from api.storage import LocalStorage

log = logging.getLogger("finegates.api")
router = APIRouter(tags=["fine-tuning"])

TASK_PARAM = "method.finegates.task"


def _ts(dt: datetime | None) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def job_object(job: Job, queue_position: int | None = None) -> JobObject:
    total = job.total_steps
    step = job.step or 0
    percent = round(min(100.0, 100.0 * step / total), 2) if total else None
    if job.status == jobstate.SUCCEEDED:
        percent = 100.0
    running = job.status == jobstate.RUNNING
    eta = None
    if running and job.estimated_finish is not None:
        eta = max(0, int((job.estimated_finish - utcnow()).total_seconds()))
    results = (job.compression or {}) if job.status == jobstate.SUCCEEDED else {}
    reached = results.get("target_reached")
    error = None
    if job.error_code:
        error = JobError(
            code=job.error_code, message=job.error_message or "", param=job.error_param
        )
    return JobObject(
        id=job.id,
        created_at=int(job.created_at.timestamp()),
        finished_at=_ts(job.finished_at),
        model=job.model,
        fine_tuned_model=job.fine_tuned_model,
        organization_id=job.tenant_id,
        result_files=[],
        status=cast(JobStatus, job.status),
        validation_file=job.validation_file,
        training_file=job.training_file,
        hyperparameters=job.hyperparameters,
        trained_tokens=job.trained_tokens,
        error=error,
        estimated_finish=_ts(job.estimated_finish) if running else None,
        seed=job.seed,
        metadata=job.metadata_,
        method=JobMethod(
            finegates=FineGatesMethod(task=job.task, hyperparameters=job.hyperparameters)
        ),
        suffix=job.suffix,
        task=job.task,
        progress=Progress(
            step=step,
            total_steps=total,
            percent=percent,
            eta_seconds=eta,
            phase=cast(Any, job.phase or "training") if running else None,
        ),
        sparsity=Sparsity(target=job.target_sparsity, measured=job.measured_sparsity),
        compression=job.compression,
        queue_position=queue_position,
        attempts=job.attempts,
        cancel_requested=bool(job.cancel_requested),
        target_reached=bool(reached) if reached is not None else None,
        eval_metrics=results.get("eval_metrics"),
        warnings=list(results.get("warnings") or []),
    )


def _job_response(session: Session, job: Job) -> JobObject:
    return job_object(job, jobstate.queue_position(session, job))


def _request_hash(body: JobCreate) -> str:
    canon = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_model(model_id: str, task: str, settings: Settings) -> None:
    from core.catalog import is_hub_id

    entries = base_models(settings)
    entry = entries.get(model_id)
    if entry is None:
        if settings.allow_hub and is_hub_id(model_id):
            # owner/name only (never a path): fetched (safetensors only) by the worker,
            # which resolves tenant ids with allow_paths=False
            return
        if model_id.startswith("ft:"):
            raise APIError(
                400,
                f"Fine-tuning a fine-tuned model ('{model_id}') is not supported; "
                f"start from a base model: {', '.join(sorted(entries))}",
                param="model",
                code="model_not_supported",
            )
        hub = "" if settings.allow_hub else " (Hugging Face hub ids are disabled here)"
        raise APIError(
            400,
            f"Unknown model '{model_id}'; choose one of: {', '.join(sorted(entries))}{hub}",
            param="model",
            code="model_not_found",
        )
    from core.families import FAMILY_TASKS, supported_text, task_error

    if entry.family not in FAMILY_TASKS:
        raise APIError(
            400,
            f"Model '{model_id}' has a model type FineGates cannot prune; "
            f"supported model types: {supported_text()}",
            param="model",
            code="model_not_supported",
        )
    mismatch = task_error(entry.family, task)
    if mismatch:
        raise APIError(
            400,
            f"Model '{model_id}': {mismatch}; use a base model such as "
            f"{'smollm2-135m' if entry.family == 'bert' else 'minilm-l6'}, or another task",
            param="model",
            code="model_task_mismatch",
        )


def _training_file(session: Session, tenant_id: str, file_id: str, param: str) -> File:
    f = load_owned_file(session, tenant_id, file_id, param)
    if f.purpose != "fine-tune" or f.status != "processed":
        raise APIError(
            400,
            f"File '{file_id}' cannot be used for fine-tuning (purpose {f.purpose}, "
            f"status {f.status})",
            param=param,
            code="invalid_file",
        )
    return f


def _check_file_task(f: File, task: str, param: str, storage: LocalStorage) -> None:
    """Re-validate a file under the requested task when it differs from the detected one."""
    if f.task == task:
        return
    from core.data import validate_file
    from core.errors import DataError

    try:
        validate_file(storage.path(f.storage_key), task=task)
    except DataError as exc:
        where = f"{f.filename}" + (f", line {exc.line}" if exc.line is not None else "")
        raise APIError(
            400,
            f"File '{f.id}' ({where}) does not fit task '{task}': {exc.reason}",
            param=param,
            code="invalid_file",
            line=exc.line,
        ) from None


def _replay(session: Session, tenant_id: str, key: str, req_hash: str) -> Job | None:
    job = session.execute(
        select(Job).where(Job.tenant_id == tenant_id, Job.idempotency_key == key)
    ).scalar_one_or_none()
    if job is None:
        return None
    if job.request_hash != req_hash:
        raise APIError(
            409,
            "This Idempotency-Key was already used with a different request body; "
            "use a new key for a different job",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    return job


@router.post("/fine_tuning/jobs", response_model=JobObject)
def create_job(
    body: JobCreate,
    request: Request,
    response: Response,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=256)] = None,
) -> JobObject:
    from core.config import Hyperparameters

    tenant_id = principal.tenant_id
    req_hash = _request_hash(body)
    if idempotency_key:
        existing = _replay(session, tenant_id, idempotency_key, req_hash)
        if existing is not None:
            response.headers["Idempotent-Replayed"] = "true"
            return _job_response(session, existing)

    fg = body.method.finegates if body.method and body.method.finegates else None
    hp_in: dict[str, Any] = dict(fg.hyperparameters) if fg and fg.hyperparameters else {}
    if not hp_in and body.hyperparameters:
        hp_in = dict(body.hyperparameters)
    if body.seed is not None:
        if "seed" in hp_in and hp_in["seed"] != body.seed:
            raise APIError(
                400, "seed is given twice with different values (top level and hyperparameters)",
                param="seed",
            )  # fmt: skip
        hp_in["seed"] = body.seed
    hp = Hyperparameters.from_dict(hp_in)  # ConfigError -> 400 with param = field name
    hp_dict = hp.to_dict()

    train = _training_file(session, tenant_id, body.training_file, "training_file")
    valid = (
        _training_file(session, tenant_id, body.validation_file, "validation_file")
        if body.validation_file
        else None
    )
    task = (fg.task if fg else None) or train.task
    if task is None:
        raise APIError(400, "Could not detect the task from the training file", param=TASK_PARAM)
    _check_model(body.model, task, settings)
    _check_file_task(train, task, "training_file", storage)
    if valid is not None:
        _check_file_task(valid, task, "validation_file", storage)

    check_job_size(hp_dict, task, settings)
    limits = principal.limits or limits_for(session, settings, tenant_id)
    with tenant_lock(session, tenant_id):  # count and insert atomically (commit inside)
        check_active_jobs(session, tenant_id, limits.max_active_jobs)
        job = _insert_job(
            session, response, body, tenant_id, task, train, valid, hp, hp_dict, settings,
            idempotency_key, req_hash,
        )  # fmt: skip
        if isinstance(job, JobObject):
            return job  # an idempotent replay raced this request
    session.refresh(job)
    return _enqueue(request, session, job)


def _insert_job(
    session: Session,
    response: Response,
    body: JobCreate,
    tenant_id: str,
    task: str,
    train: File,
    valid: File | None,
    hp: Any,
    hp_dict: dict[str, Any],
    settings: Settings,
    idempotency_key: str | None,
    req_hash: str,
) -> Job | JobObject:
    job = Job(
        id=new_id("ftjob-"),
        tenant_id=tenant_id,
        status=jobstate.VALIDATING,
        model=body.model,
        task=task,
        training_file=train.id,
        validation_file=valid.id if valid else None,
        hyperparameters=hp_dict,
        suffix=body.suffix,
        seed=int(hp_dict.get("seed", 0)),
        metadata_=body.metadata,
        target_sparsity=float(hp.target_sparsity),
        step=0,
        cancel_requested=False,
        attempts=0,
        queue=settings.default_queue,
        idempotency_key=idempotency_key,
        request_hash=req_hash,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        if idempotency_key:
            existing = _replay(session, tenant_id, idempotency_key, req_hash)
            if existing is not None:
                response.headers["Idempotent-Replayed"] = "true"
                return _job_response(session, existing)
        raise
    jobstate.add_event(
        session,
        job.id,
        f"Created fine-tuning job {job.id} ({task} on {body.model})",
        commit=False,
    )
    jobstate.mark_queued(session, job.id, commit=False)
    session.commit()
    return job


def _enqueue(request: Request, session: Session, job: Job) -> JobObject:
    enqueue = request.app.state.enqueue
    try:
        enqueue(job.id, job.queue)
    except Exception as exc:
        # The job is committed and stays queued: the workers' periodic queue sweep
        # (worker/reaper.py) publishes it once the broker answers, so answering an error
        # here would only invite a duplicate submission.
        log.exception("enqueue failed for %s", job.id)
        jobstate.add_event(
            session,
            job.id,
            f"The queue could not be reached ({type(exc).__name__}); the job stays queued "
            "and is published again as soon as the queue answers",
            level="warning",
        )
    return _job_response(session, job)


@router.get("/fine_tuning/jobs", response_model=CountedPage[JobObject])
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: JobStatus | None = None,
) -> dict[str, Any]:
    """Newest first; ``count`` is the number of the caller's jobs with this ``status``."""
    tenant = principal.tenant_id
    where = [Job.tenant_id == tenant]
    if status:
        where.append(Job.status == status)
    cursor = pagination.cursor_key(
        session, after, Job.pk, Job.id == after, Job.tenant_id == tenant, kind="job"
    )
    page = pagination.paginate(
        session,
        select(Job, jobstate.queue_position_expr()).where(*where),
        Job.pk,
        lambda row: job_object(row[0], row[1]),
        after=cursor,
        limit=limit,
        descending=True,
    )
    return {**page, "count": pagination.count(session, select(Job.pk).where(*where))}


def _job_status_body(sessionmaker: Any, tenant_id: str, job_id: str) -> bytes | None:
    """The polling read, in ONE thread hop: the row and its queue position in one
    statement, the session closed, the JSON serialized once (not validated again as a
    response model)."""
    with sessionmaker() as session:
        row = session.execute(
            select(Job, jobstate.queue_position_expr()).where(
                Job.id == job_id, Job.tenant_id == tenant_id
            )
        ).one_or_none()
        if row is None:
            return None
        job, position = row
        return job_object(job, position).model_dump_json().encode()


@router.get(
    "/fine_tuning/jobs/{job_id}",
    response_model=JobObject,
    responses={304: {"description": "Not modified (the If-None-Match ETag still matches)"}},
)
async def get_job(
    job_id: Annotated[str, Path(max_length=64)], principal: PrincipalDep, request: Request
) -> Response:
    """THE polling route. Answers with an ``ETag``; a client sending it back in
    ``If-None-Match`` gets ``304 Not Modified`` (no body) while nothing changed."""
    body = await run_in_threadpool(
        _job_status_body, request.app.state.sessionmaker, principal.tenant_id, job_id
    )
    if body is None:
        raise not_found("job", job_id)
    etag = f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    inm = request.headers.get("if-none-match")
    if inm is not None and etag in {t.strip().removeprefix("W/") for t in inm.split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type="application/json", headers=headers)


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject)
def cancel_job(job: OwnedJob, session: SessionDep) -> JobObject:
    if job.status in (jobstate.SUCCEEDED, jobstate.FAILED):
        raise APIError(
            409,
            f"Job {job.id} has already {job.status}; only unfinished jobs can be cancelled",
            param="job_id",
            code="job_finished",
        )
    jobstate.request_cancel(session, job.id)
    session.expire_all()
    fresh = session.execute(select(Job).where(Job.id == job.id)).scalar_one()
    return _job_response(session, fresh)


def _event_object(e: JobEvent) -> JobEventObject:
    return JobEventObject(
        id=f"ftevent-{e.pk}",
        created_at=int(e.created_at.timestamp()),
        level=cast(Any, e.level),
        message=e.message,
        type=cast(Any, e.type),
        data=e.data,
    )


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=Page[JobEventObject])
def list_events(
    job: OwnedJob,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    """Newest first, like OpenAI; ``after`` is the last event id of the previous page."""
    return pagination.paginate(
        session,
        select(JobEvent).where(JobEvent.job_id == job.id),
        JobEvent.pk,
        lambda row: _event_object(row[0]),
        after=pagination.prefixed_pk_cursor(after, "ftevent-"),
        limit=limit,
        descending=True,
    )


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=Page[CheckpointObject])
def list_checkpoints(
    job: OwnedJob,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    """Latest step first."""

    def checkpoint_object(c: Checkpoint) -> CheckpointObject:
        return CheckpointObject(
            id=c.id,
            created_at=int(c.created_at.timestamp()),
            # usable as a model id once the job has succeeded (pruned then)
            fine_tuned_model_checkpoint=checkpoint_model_id(job.model, job.suffix, job.id, c.step),
            fine_tuning_job_id=job.id,
            step_number=c.step,
            metrics={**(c.metrics or {}), "step": c.step},
        )

    cursor = pagination.cursor_key(
        session,
        after,
        Checkpoint.step,
        Checkpoint.id == after,
        Checkpoint.job_id == job.id,
        kind="checkpoint",
    )
    return pagination.paginate(
        session,
        select(Checkpoint).where(Checkpoint.job_id == job.id),
        Checkpoint.step,
        lambda row: checkpoint_object(row[0]),
        after=cursor,
        limit=limit,
        descending=True,
    )


def _metric_point(m: JobMetric) -> MetricPoint:
    return MetricPoint(
        id=f"ftmetric-{m.pk}",
        created_at=int(m.created_at.timestamp()),
        kind=cast(Any, m.kind),
        step=m.step,
        loss=m.loss,
        lr=m.lr,
        measured_sparsity=m.measured_sparsity,
        metrics={k: v for k, v in (m.metrics or {}).items() if k != "gates"},  # see routes/gates
    )


@router.get("/fine_tuning/jobs/{job_id}/metrics", response_model=Page[MetricPoint])
def list_metrics(
    job: OwnedJob,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    kind: Literal["train", "eval"] | None = None,
) -> dict[str, Any]:
    """The time series in step order: loss, lr, task metrics and MEASURED sparsity."""
    stmt = select(JobMetric).where(JobMetric.job_id == job.id)
    if kind:
        stmt = stmt.where(JobMetric.kind == kind)
    return pagination.paginate(
        session,
        stmt,
        JobMetric.pk,
        lambda row: _metric_point(row[0]),
        after=pagination.prefixed_pk_cursor(after, "ftmetric-"),
        limit=limit,
        descending=False,
    )
