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
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api import jobstate
from api.db.models import Checkpoint, File, Job, JobEvent, JobMetric, new_id, utcnow
from api.deps import OwnedJob, PrincipalDep, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, not_found
from api.schemas import (
    CheckpointList,
    EventList,
    JobCreate,
    JobList,
    JobObject,
    MetricList,
)
from api.settings import Settings
from api.storage import LocalStorage

log = logging.getLogger("finegates.api")
router = APIRouter(tags=["fine-tuning"])

TASK_PARAM = "method.finegates.task"


def _ts(dt: datetime | None) -> int | None:
    return int(dt.timestamp()) if dt is not None else None


def job_to_dict(job: Job, queue_position: int | None = None) -> dict[str, Any]:
    now = utcnow()
    total = job.total_steps
    step = job.step or 0
    percent = round(min(100.0, 100.0 * step / total), 2) if total else None
    if job.status == jobstate.SUCCEEDED:
        percent = 100.0
    eta = None
    if job.status == jobstate.RUNNING and job.estimated_finish is not None:
        eta = max(0, int((job.estimated_finish - now).total_seconds()))
    error = None
    if job.error_code:
        error = {
            "code": job.error_code,
            "message": job.error_message or "",
            "param": job.error_param,
        }
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": _ts(job.created_at),
        "finished_at": _ts(job.finished_at),
        "model": job.model,
        "fine_tuned_model": job.fine_tuned_model,
        "organization_id": job.tenant_id,
        "result_files": [],
        "status": job.status,
        "validation_file": job.validation_file,
        "training_file": job.training_file,
        "hyperparameters": job.hyperparameters,
        "trained_tokens": job.trained_tokens,
        "error": error,
        "estimated_finish": _ts(job.estimated_finish) if job.status == jobstate.RUNNING else None,
        "seed": job.seed,
        "metadata": job.metadata_,
        "method": {
            "type": "finegates",
            "finegates": {"task": job.task, "hyperparameters": job.hyperparameters},
        },
        "suffix": job.suffix,
        "integrations": [],
        "task": job.task,
        "progress": {
            "step": step,
            "total_steps": total,
            "percent": percent,
            "eta_seconds": eta,
        },
        "sparsity": {"target": job.target_sparsity, "measured": job.measured_sparsity},
        "compression": job.compression,
        "queue_position": queue_position,
        "attempts": job.attempts,
        "cancel_requested": bool(job.cancel_requested),
    }


def _job_response(session: Session, job: Job) -> dict[str, Any]:
    return job_to_dict(job, jobstate.queue_position(session, job))


def _request_hash(body: JobCreate) -> str:
    canon = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def _check_model(model_id: str, task: str, settings: Settings) -> None:
    from core.catalog import is_hub_id, list_models

    entries = {m.id: m for m in list_models(settings.data_path, allow_hub=settings.allow_hub)}
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


def _owned_file(session: Session, tenant_id: str, file_id: str, param: str) -> File:
    f = session.execute(
        select(File).where(File.id == file_id, File.tenant_id == tenant_id)
    ).scalar_one_or_none()
    if f is None:
        raise APIError(404, f"No file with id '{file_id}'", param=param, code="file_not_found")
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
) -> dict[str, Any]:
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

    train = _owned_file(session, tenant_id, body.training_file, "training_file")
    valid = (
        _owned_file(session, tenant_id, body.validation_file, "validation_file")
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

    active = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(list(jobstate.ACTIVE)))
    ).scalar_one()
    if active >= settings.max_active_jobs_per_tenant:
        raise APIError(
            429,
            f"You have {active} unfinished jobs (limit {settings.max_active_jobs_per_tenant}); "
            "wait for some to finish or cancel them",
            code="too_many_active_jobs",
        )

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
    session.refresh(job)

    enqueue = request.app.state.enqueue
    try:
        enqueue(job.id, job.queue)
    except Exception as exc:
        # The job is committed and stays queued: workers re-publish queued jobs when they
        # start (worker/reaper.py), so answering an error here would only invite a
        # duplicate submission.
        log.exception("enqueue failed for %s", job.id)
        jobstate.add_event(
            session,
            job.id,
            f"The queue could not be reached ({type(exc).__name__}); the job stays queued "
            "and is published again when a worker starts",
            level="warning",
        )
    return _job_response(session, job)


@router.get("/fine_tuning/jobs", response_model=JobList)
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    status: str | None = None,
) -> dict[str, Any]:
    q = select(Job).where(Job.tenant_id == principal.tenant_id)
    if status:
        if status not in jobstate.STATUSES:
            raise APIError(
                400, f"status must be one of {', '.join(jobstate.STATUSES)}", param="status"
            )
        q = q.where(Job.status == status)
    if after:
        pk = session.execute(
            select(Job.pk).where(Job.id == after, Job.tenant_id == principal.tenant_id)
        ).scalar_one_or_none()
        if pk is None:
            raise APIError(400, f"No job with id '{after}' to page after", param="after")
        q = q.where(Job.pk < pk)
    count = session.execute(
        select(func.count()).select_from(Job).where(Job.tenant_id == principal.tenant_id)
    ).scalar_one()
    q2 = q.add_columns(jobstate.queue_position_expr())
    rows = [(r[0], r[1]) for r in session.execute(q2.order_by(Job.pk.desc()).limit(limit + 1))]
    return {
        "object": "list",
        "data": [job_to_dict(j, pos) for j, pos in rows[:limit]],
        "has_more": len(rows) > limit,
        "count": count,
    }


@router.get("/fine_tuning/jobs/{job_id}", response_model=JobObject)
async def get_job(job: OwnedJob) -> dict[str, Any]:
    # No I/O here: OwnedJob loaded the row and its queue position in one statement.
    return job_to_dict(job, job._queue_position)  # type: ignore[attr-defined]


@router.post("/fine_tuning/jobs/{job_id}/cancel", response_model=JobObject)
def cancel_job(job: OwnedJob, session: SessionDep) -> dict[str, Any]:
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


def _pk_cursor(after: str | None, prefix: str) -> int | None:
    if after is None:
        return None
    if not after.startswith(prefix) or not after[len(prefix) :].isdigit():
        raise APIError(400, f"after must be an id like '{prefix}123'", param="after")
    return int(after[len(prefix) :])


@router.get("/fine_tuning/jobs/{job_id}/events", response_model=EventList)
def list_events(
    job: OwnedJob,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
) -> dict[str, Any]:
    """Newest first, like OpenAI; ``after`` is the last event id of the previous page."""
    q = select(JobEvent).where(JobEvent.job_id == job.id)
    cursor = _pk_cursor(after, "ftevent-")
    if cursor is not None:
        q = q.where(JobEvent.pk < cursor)
    rows = list(session.execute(q.order_by(JobEvent.pk.desc()).limit(limit + 1)).scalars())
    return {
        "object": "list",
        "data": [
            {
                "id": f"ftevent-{e.pk}",
                "object": "fine_tuning.job.event",
                "created_at": _ts(e.created_at),
                "level": e.level,
                "message": e.message,
                "type": e.type,
                "data": e.data,
            }
            for e in rows[:limit]
        ],
        "has_more": len(rows) > limit,
    }


@router.get("/fine_tuning/jobs/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(
    job: OwnedJob,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 10,
) -> dict[str, Any]:
    q = select(Checkpoint).where(Checkpoint.job_id == job.id)
    if after:
        step = session.execute(
            select(Checkpoint.step).where(Checkpoint.id == after, Checkpoint.job_id == job.id)
        ).scalar_one_or_none()
        if step is None:
            raise APIError(400, f"No checkpoint with id '{after}' in this job", param="after")
        q = q.where(Checkpoint.step < step)
    rows = list(session.execute(q.order_by(Checkpoint.step.desc()).limit(limit + 1)).scalars())
    data = [
        {
            "id": c.id,
            "object": "fine_tuning.job.checkpoint",
            "created_at": _ts(c.created_at),
            "fine_tuned_model_checkpoint": f"ft:{job.model}:{job.id}:ckpt-step-{c.step}",
            "fine_tuning_job_id": job.id,
            "step_number": c.step,
            "metrics": {"step": c.step, **(c.metrics or {})},
        }
        for c in rows[:limit]
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": len(rows) > limit,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


@router.get("/fine_tuning/jobs/{job_id}/metrics", response_model=MetricList)
def list_metrics(
    job: OwnedJob,
    session: SessionDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    kind: Annotated[str | None, Query(pattern="^(train|eval)$")] = None,
) -> dict[str, Any]:
    """The time series in step order: loss, lr, task metrics and MEASURED sparsity."""
    q = select(JobMetric).where(JobMetric.job_id == job.id)
    if kind:
        q = q.where(JobMetric.kind == kind)
    cursor = _pk_cursor(after, "ftmetric-")
    if cursor is not None:
        q = q.where(JobMetric.pk > cursor)
    rows = list(session.execute(q.order_by(JobMetric.pk.asc()).limit(limit + 1)).scalars())
    return {
        "object": "list",
        "data": [
            {
                "id": f"ftmetric-{m.pk}",
                "object": "fine_tuning.job.metric",
                "created_at": _ts(m.created_at),
                "kind": m.kind,
                "step": m.step,
                "loss": m.loss,
                "lr": m.lr,
                "measured_sparsity": m.measured_sparsity,
                "metrics": m.metrics or {},
            }
            for m in rows[:limit]
        ],
        "has_more": len(rows) > limit,
    }


__all__ = ["job_to_dict", "not_found", "router"]
