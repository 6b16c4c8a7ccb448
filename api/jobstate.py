"""THE job state machine. Every status change in the code base goes through here.

    validating_files -> queued -> running -> succeeded | failed | cancelled
    validating_files | queued -> cancelled | failed
    running -> queued            (the reaper, when a worker died; attempts < limit)

Why guarded updates: the API, several workers and the reaper race on the same row.
Each transition is ``UPDATE jobs SET ... WHERE id = :id AND status = :expected`` (and,
for a worker, ``AND worker_id = :me``), so exactly one of the racers wins and the others
learn it from the row count instead of overwriting each other. Each function is one
transaction: it commits on success (events are written in the same transaction as the
change they describe). No fastapi here: the worker imports this module. It is longer than
most modules on purpose: every guarded transition sits next to the others, so the
diagram above can be checked against one file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import case, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from api.db.models import Checkpoint, FineTunedModel, Job, JobEvent, JobMetric, new_id, utcnow

VALIDATING = "validating_files"
QUEUED = "queued"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATUSES = (VALIDATING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({VALIDATING, QUEUED, RUNNING})
LEVELS = ("info", "warning", "error")
EVENT_TYPES = ("message", "metrics")


@dataclass
class ProgressAck:
    """What the worker learns from a progress write, without an extra query.

    ``owned`` False: the job is no longer running under this worker (reaped, failed,
    cancelled elsewhere); the worker must stop. ``cancel_requested``: stop cleanly.
    """

    owned: bool
    cancel_requested: bool


@dataclass
class ReapedJob:
    job_id: str
    status: str  # queued (to re-enqueue after commit) | failed | cancelled
    queue: str


def db_now(session: Session) -> Any:
    """The database's clock, for heartbeats and the reaper's cutoff.

    Why: a worker's clock and the reaper's may disagree (and a worker paused through a
    database outage must not look fresh because of its own clock). PostgreSQL stamps
    and compares with ``now()``; SQLite lives on this host, so the host clock IS its clock.
    """
    if session.get_bind().dialect.name == "postgresql":
        return func.now()
    return utcnow()


def _event_row(job_id: str, message: str, level: str, type_: str, data: Any, at: datetime) -> dict:
    if level not in LEVELS:
        raise ValueError(f"event level must be one of {LEVELS}, got {level!r}")
    if type_ not in EVENT_TYPES:
        raise ValueError(f"event type must be one of {EVENT_TYPES}, got {type_!r}")
    return {
        "job_id": job_id,
        "message": message,
        "level": level,
        "type": type_,
        "data": data,
        "created_at": at,
    }


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: Mapping[str, Any] | None = None,
    commit: bool = True,
) -> None:
    session.execute(
        insert(JobEvent),
        [_event_row(job_id, message, level, type, dict(data) if data else None, utcnow())],
    )
    if commit:
        session.commit()


def _guarded(
    session: Session,
    job_id: str,
    expected: Iterable[str],
    values: dict[str, Any],
    worker_id: str | None = None,
    where: Iterable[Any] = (),
) -> bool:
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(list(expected)), *where)
    if worker_id is not None:
        stmt = stmt.where(Job.worker_id == worker_id)
    res = session.execute(stmt.values(**values), execution_options={"synchronize_session": False})
    return res.rowcount == 1  # type: ignore[attr-defined]


def _finish(
    session: Session,
    job_id: str,
    expected: Iterable[str],
    values: dict[str, Any],
    worker_id: str | None,
    event: tuple[str, str] | None,
) -> bool:
    now = utcnow()
    values = {"finished_at": now, "estimated_finish": None, **values}
    ok = _guarded(session, job_id, expected, values, worker_id)
    if ok and event is not None:
        add_event(session, job_id, event[1], level=event[0], commit=False)
    if ok:
        session.commit()
    else:
        session.rollback()
    return ok


# --- API side ---------------------------------------------------------------------------


def mark_queued(session: Session, job_id: str, *, commit: bool = True) -> bool:
    """validating_files -> queued, once the files and config have been checked."""
    ok = _guarded(session, job_id, [VALIDATING], {"status": QUEUED})
    if ok:
        add_event(session, job_id, "Files validated; job queued", commit=False)
        if commit:
            session.commit()
    return ok


def request_cancel(session: Session, job_id: str) -> str:
    """Cancel now if nothing runs it, else raise the flag the training callback checks.

    Returns the job's status afterwards. Why a loop: a worker may claim the job between
    our two guarded updates; then the second path (flag on a running job) applies.
    """
    for _ in range(3):
        now = utcnow()
        if _guarded(
            session,
            job_id,
            [VALIDATING, QUEUED],
            {"status": CANCELLED, "finished_at": now, "cancel_requested": True},
        ):
            add_event(session, job_id, "Job cancelled before it started", commit=False)
            session.commit()
            return CANCELLED
        if _guarded(session, job_id, [RUNNING], {"cancel_requested": True}):
            add_event(
                session,
                job_id,
                "Cancellation requested; the worker stops at the next step",
                commit=False,
            )
            session.commit()
            return RUNNING
        status = session.execute(select(Job.status).where(Job.id == job_id)).scalar_one_or_none()
        if status is None:
            raise LookupError(job_id)
        if status in TERMINAL:
            session.rollback()
            return status
    session.rollback()
    return session.execute(select(Job.status).where(Job.id == job_id)).scalar_one()


def finish_failed(
    session: Session,
    job_id: str,
    code: str,
    message: str,
    param: str | None = None,
    *,
    worker_id: str | None = None,
) -> bool:
    """Any active state -> failed, with an OpenAI-shaped error (code, message, param)."""
    return _finish(
        session,
        job_id,
        [RUNNING] if worker_id is not None else list(ACTIVE),
        {"status": FAILED, "error_code": code, "error_message": message, "error_param": param},
        worker_id,
        ("error", f"Job failed: {message}"),
    )


# --- worker side ------------------------------------------------------------------------


def claim(session: Session, job_id: str, worker_id: str, *, run_dir: str | None = None) -> bool:
    """queued -> running for ``worker_id``; False means someone else has it (or it's done).

    A queued job whose cancel flag is set (raised while it was running, then handed back)
    goes to cancelled instead of running again.
    """
    now = utcnow()
    if _guarded(
        session,
        job_id,
        [QUEUED],
        {"status": CANCELLED, "finished_at": now, "estimated_finish": None, "worker_id": None},
        where=[Job.cancel_requested.is_(True)],
    ):
        add_event(session, job_id, "Job cancelled before it resumed", commit=False)
        session.commit()
        return False
    values: dict[str, Any] = {
        "status": RUNNING,
        "worker_id": worker_id,
        "heartbeat_at": db_now(session),
        "attempts": Job.attempts + 1,
        "started_at": func.coalesce(Job.started_at, now),
    }
    if run_dir is not None:
        values["run_dir"] = run_dir
    ok = _guarded(session, job_id, [QUEUED], values, where=[Job.cancel_requested.is_not(True)])
    if not ok:
        session.rollback()
        return False
    attempts = session.execute(select(Job.attempts).where(Job.id == job_id)).scalar_one()
    msg = "Job started" if attempts == 1 else f"Job resumed (attempt {attempts})"
    add_event(
        # no worker id in the event: it names the server's host and pid (tenants read events)
        session,
        job_id,
        msg,
        data={"attempt": attempts},
        commit=False,
    )
    session.commit()
    return True


def record_progress(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    step: int | None = None,
    total_steps: int | None = None,
    trained_tokens: int | None = None,
    estimated_finish: datetime | None = None,
    measured_sparsity: float | None = None,
    events: Iterable[Mapping[str, Any]] = (),
    metrics: Iterable[Mapping[str, Any]] = (),
    phase: str | None = None,
) -> ProgressAck:
    """One transaction for a batch: progress columns + heartbeat + events + metric points.

    events: dicts with message, and optionally level, type, data, created_at.
    metrics: dicts with step, and optionally kind ("train"|"eval"), loss, lr,
    measured_sparsity, metrics (dict of task metrics), created_at.
    """
    now = utcnow()
    values: dict[str, Any] = {"heartbeat_at": db_now(session)}
    for name, val in (
        ("step", step),
        ("total_steps", total_steps),
        ("trained_tokens", trained_tokens),
        ("estimated_finish", estimated_finish),
        ("measured_sparsity", measured_sparsity),
        ("phase", phase),
    ):
        if val is not None:
            values[name] = val
    if not _guarded(session, job_id, [RUNNING], values, worker_id):
        session.rollback()
        return ProgressAck(owned=False, cancel_requested=False)
    ev_rows = [
        _event_row(
            job_id,
            str(e["message"]),
            e.get("level", "info"),
            e.get("type", "message"),
            e.get("data"),
            e.get("created_at") or now,
        )
        for e in events
    ]
    if ev_rows:
        session.execute(insert(JobEvent), ev_rows)
    m_rows = [
        {
            "job_id": job_id,
            "kind": m.get("kind", "train"),
            "step": int(m["step"]),
            "loss": m.get("loss"),
            "lr": m.get("lr"),
            "measured_sparsity": m.get("measured_sparsity"),
            "metrics": m.get("metrics"),
            "created_at": m.get("created_at") or now,
        }
        for m in metrics
    ]
    if m_rows:
        session.execute(insert(JobMetric), m_rows)
    cancel = session.execute(select(Job.cancel_requested).where(Job.id == job_id)).scalar_one()
    session.commit()
    return ProgressAck(owned=True, cancel_requested=bool(cancel))


def add_checkpoint(
    session: Session,
    job_id: str,
    step: int,
    path: str,
    metrics: Mapping[str, Any] | None = None,
    *,
    worker_id: str | None = None,
) -> str | None:
    """Record a checkpoint (idempotent per job and step: a resumed run may save it again).

    With ``worker_id`` (the worker's call), only while the job runs under that worker:
    a worker that lost the job must not list its files on the new owner's job. The
    guard is an UPDATE of the heartbeat, so the row stays locked until the commit.
    Returns None when refused.
    """
    if worker_id is not None and not _guarded(
        session, job_id, [RUNNING], {"heartbeat_at": db_now(session)}, worker_id
    ):
        session.rollback()
        return None
    existing = session.execute(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step == step)
    ).scalar_one_or_none()
    if existing is not None:
        existing.path = path
        existing.metrics = dict(metrics) if metrics else None
        session.commit()
        return existing.id
    ckpt_id = new_id("ftckpt-")
    session.add(
        Checkpoint(
            id=ckpt_id,
            job_id=job_id,
            step=step,
            path=path,
            metrics=dict(metrics) if metrics else None,
        )
    )
    add_event(
        session, job_id, f"Checkpoint saved at step {step}", data={"step": step}, commit=False
    )
    session.commit()
    return ckpt_id


def finish_succeeded(
    session: Session,
    job_id: str,
    worker_id: str | None,
    *,
    fine_tuned_model: str,
    artifact_dir: str,
    trained_tokens: int | None = None,
    measured_sparsity: float | None = None,
    compression: Mapping[str, Any] | None = None,
    message: str | None = None,
) -> bool:
    """running -> succeeded AND the models row, in one transaction (never one without the other).

    artifact_dir: absolute, or relative to the data directory.
    """
    job = session.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
    if job is None:
        return False
    values: dict[str, Any] = {"status": SUCCEEDED, "fine_tuned_model": fine_tuned_model}
    if trained_tokens is not None:
        values["trained_tokens"] = trained_tokens
    if measured_sparsity is not None:
        values["measured_sparsity"] = measured_sparsity
    if compression is not None:
        values["compression"] = dict(compression)
    if job.total_steps is not None:
        values["step"] = func.coalesce(Job.step, job.total_steps)
    ok = _guarded(
        session,
        job_id,
        [RUNNING],
        {"finished_at": utcnow(), "estimated_finish": None, **values},
        worker_id,
    )
    if not ok:
        session.rollback()
        return False
    session.add(
        FineTunedModel(
            id=fine_tuned_model,
            tenant_id=job.tenant_id,
            job_id=job_id,
            base_model=job.model,
            task=job.task,
            artifact_dir=artifact_dir,
            summary=dict(compression) if compression is not None else None,
        )
    )
    add_event(
        session,
        job_id,
        message or f"Job succeeded; model {fine_tuned_model} is ready",
        data={"fine_tuned_model": fine_tuned_model},
        commit=False,
    )
    session.commit()
    return True


def finish_cancelled(
    session: Session, job_id: str, worker_id: str | None = None, message: str | None = None
) -> bool:
    """running -> cancelled (the worker stopped after seeing the flag)."""
    return _finish(
        session,
        job_id,
        [RUNNING] if worker_id is not None else [RUNNING, QUEUED, VALIDATING],
        {"status": CANCELLED},
        worker_id,
        ("info", message or "Job cancelled"),
    )


def release(session: Session, job_id: str, worker_id: str, message: str | None = None) -> bool:
    """running -> queued by its own worker, which is shutting down cleanly.

    The worker has just written a checkpoint, so the attempt it used is given back: a
    deliberate restart of ``finegates serve`` must not count toward the retry limit.
    A job whose cancel flag is set goes to cancelled instead (returns False; the caller
    reads the status): requeueing it would run a job the user asked to stop.
    """
    if _guarded(
        session,
        job_id,
        [RUNNING],
        {"status": CANCELLED, "finished_at": utcnow(), "estimated_finish": None},
        worker_id,
        where=[Job.cancel_requested.is_(True)],
    ):
        add_event(session, job_id, "Job cancelled (the worker stopped)", commit=False)
        session.commit()
        return False
    ok = _guarded(
        session,
        job_id,
        [RUNNING],
        {
            "status": QUEUED,
            "worker_id": None,
            "heartbeat_at": None,
            "attempts": Job.attempts - 1,  # claim() added one; running implies >= 1
            "published_at": utcnow(),  # the caller publishes right after the commit
        },
        worker_id,
    )
    if not ok:
        session.rollback()
        return False
    add_event(
        session, job_id, message or "Job handed back to the queue", level="warning", commit=False
    )
    session.commit()
    return True


def requeue_stale(
    session: Session,
    stale_after_s: float,
    max_attempts: int,
    *,
    now: datetime | None = None,
) -> list[ReapedJob]:
    """For the reaper: running jobs whose heartbeat is older than ``stale_after_s``.

    Each goes back to queued (to resume from its last checkpoint) while attempts <
    max_attempts, to cancelled if a cancel was requested, else to failed with a clear
    error. The caller re-enqueues the ``queued`` ones AFTER this returns (committed).
    """
    base = now if now is not None else db_now(session)  # ``now``: tests move the clock
    now = now or utcnow()
    cutoff = base - timedelta(seconds=stale_after_s)
    rows = session.execute(
        select(
            Job.id, Job.worker_id, Job.attempts, Job.queue, Job.cancel_requested, Job.heartbeat_at
        ).where(Job.status == RUNNING, Job.heartbeat_at < cutoff)
    ).all()
    session.rollback()
    out: list[ReapedJob] = []
    for job_id, worker_id, attempts, queue, cancel, hb in rows:
        last_ckpt = session.execute(
            select(func.max(Checkpoint.step)).where(Checkpoint.job_id == job_id)
        ).scalar_one_or_none()
        since = f"last heartbeat {hb.isoformat()}" if hb else "no heartbeat"
        where_ckpt = f"step {last_ckpt}" if last_ckpt is not None else "the start (no checkpoint)"
        guard = [Job.heartbeat_at < cutoff]
        if cancel:
            values: dict[str, Any] = {"status": CANCELLED, "finished_at": now, "worker_id": None}
            msg, level, status = "Worker lost while cancelling; job cancelled", "info", CANCELLED
        elif attempts < max_attempts:
            values = {
                "status": QUEUED,
                "worker_id": None,
                "heartbeat_at": None,
                "published_at": now,
            }
            msg = (
                f"Worker {worker_id} stopped responding ({since}); job requeued to resume "
                f"from {where_ckpt} (attempt {attempts} of {max_attempts} used)"
            )
            level, status = "warning", QUEUED
        else:
            msg = (
                f"the worker running this job stopped responding {attempts} times "
                f"(limit {max_attempts}); {since}; last checkpoint at {where_ckpt}"
            )
            values = {
                "status": FAILED,
                "finished_at": now,
                "estimated_finish": None,
                "worker_id": None,
                "error_code": "worker_lost",
                "error_message": msg,
                "error_param": None,
            }
            level, status = "error", FAILED
        stmt = (
            update(Job)
            .where(Job.id == job_id, Job.status == RUNNING, *guard)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if worker_id is not None:
            stmt = stmt.where(Job.worker_id == worker_id)
        if session.execute(stmt).rowcount == 1:  # type: ignore[attr-defined]
            add_event(session, job_id, msg, level=level, commit=False)
            session.commit()
            out.append(ReapedJob(job_id=job_id, status=status, queue=queue))
        else:
            session.rollback()
    return out


def db_time(session: Session) -> datetime:
    """The database clock's current time as a value (see ``db_now``)."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.execute(select(func.now())).scalar_one()
        session.rollback()
        return cast(datetime, value)
    return utcnow()


def owns(session: Session, job_id: str, worker_id: str) -> bool:
    """The fence before a write into the run directory: True while the job runs under
    ``worker_id`` (and then its heartbeat is refreshed on the database's clock)."""
    ok = _guarded(session, job_id, [RUNNING], {"heartbeat_at": db_now(session)}, worker_id)
    if ok:
        session.commit()
    else:
        session.rollback()
    return ok


def give_up_running(
    session: Session,
    job_id: str,
    worker_id: str,
    *,
    reason: str,
    max_attempts: int,
) -> str | None:
    """For the worker's watchdog: its training thread is stuck, the job leaves it.

    Back to queued (its message is published by the caller) while attempts < limit,
    else failed ``job_stalled``; a cancel-flagged job goes to cancelled. Returns the new
    status, or None when the job was no longer this worker's.
    """
    row = session.execute(
        select(Job.attempts, Job.cancel_requested).where(
            Job.id == job_id, Job.status == RUNNING, Job.worker_id == worker_id
        )
    ).one_or_none()
    if row is None:
        session.rollback()
        return None
    attempts, cancel = row
    now = utcnow()
    if cancel:
        values: dict[str, Any] = {"status": CANCELLED, "finished_at": now, "worker_id": None}
        msg, level, status = f"{reason}; job cancelled as requested", "info", CANCELLED
    elif attempts < max_attempts:
        values = {"status": QUEUED, "worker_id": None, "heartbeat_at": None, "published_at": now}
        msg = f"{reason}; job requeued to resume from its last checkpoint"
        level, status = "warning", QUEUED
    else:
        msg = f"{reason} ({attempts} attempts, limit {max_attempts})"
        values = {
            "status": FAILED,
            "finished_at": now,
            "estimated_finish": None,
            "worker_id": None,
            "error_code": "job_stalled",
            "error_message": msg,
            "error_param": None,
        }
        level, status = "error", FAILED
    if not _guarded(session, job_id, [RUNNING], values, worker_id):
        session.rollback()
        return None
    add_event(session, job_id, msg, level=level, commit=False)
    session.commit()
    return status


# --- the queue sweep (worker/reaper.py) ------------------------------------------------


@dataclass
class Unpublished:
    """A queued job the sweep should publish again; ``token`` guards the take."""

    job_id: str
    queue: str
    token: datetime | None  # published_at as read
    failed_since: datetime | None


def due_for_publish(
    session: Session, queues: Iterable[str], after_s: float, *, now: datetime | None = None
) -> list[Unpublished]:
    """Queued jobs whose message may be gone: last published (or created) longer ago than
    ``after_s`` AND than half the time they have been waiting, so a job legitimately
    waiting behind a long queue gets a duplicate message only every so often (duplicates
    are harmless: the claim lets one delivery run), and a publish that failed is retried
    on every pass."""
    now = now or db_time(session)
    rows = session.execute(
        select(Job.id, Job.queue, Job.created_at, Job.published_at, Job.publish_failed_since)
        .where(Job.status == QUEUED, Job.queue.in_(list(queues)))
        .order_by(Job.pk)
    ).all()
    session.rollback()
    out: list[Unpublished] = []
    for job_id, queue, created, published, failed_since in rows:
        last = published or created
        waited = (now - created).total_seconds()
        since = (now - last).total_seconds()
        if after_s <= 0 or failed_since is not None or since >= max(after_s, waited / 2):
            out.append(Unpublished(job_id, queue, published, failed_since))
    return out


def take_publish(session: Session, job: Unpublished, *, now: datetime | None = None) -> bool:
    """Claim the right to re-publish ``job`` (one sweeper wins when several race)."""
    now = now or db_time(session)
    token = Job.published_at.is_(None) if job.token is None else Job.published_at == job.token
    ok = _guarded(session, job.job_id, [QUEUED], {"published_at": now}, where=[token])
    if ok:
        session.commit()
    else:
        session.rollback()
    return ok


def note_published(session: Session, job_id: str) -> None:
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.publish_failed_since.is_not(None))
        .values(publish_failed_since=None)
        .execution_options(synchronize_session=False)
    )
    session.commit()


def note_publish_failed(
    session: Session,
    job_id: str,
    error: str,
    give_up_s: float,
    *,
    now: datetime | None = None,
) -> str:
    """A publish failed: remember since when (the job stays due for the next pass), and
    fail the job with ``queue_unavailable`` once it has failed for ``give_up_s``.
    Returns the job's status afterwards."""
    now = now or db_time(session)
    row = session.execute(
        select(Job.status, Job.publish_failed_since).where(Job.id == job_id)
    ).one_or_none()
    if row is None or row[0] != QUEUED:
        session.rollback()
        return row[0] if row is not None else FAILED
    since = row[1] or now
    if (now - since).total_seconds() >= give_up_s:
        minutes = max(1, round(give_up_s / 60))
        ok = finish_failed(
            session,
            job_id,
            "queue_unavailable",
            f"the job could not be handed to the job queue for {minutes} minute(s) "
            f"({error}); nothing ran. Create the job again once the service is healthy",
        )
        return FAILED if ok else QUEUED
    _guarded(session, job_id, [QUEUED], {"publish_failed_since": since, "published_at": None})
    session.commit()
    return QUEUED


@lru_cache(maxsize=1)
def queue_position_expr() -> Any:
    """A scalar subquery for the queue position of the ``Job`` row being selected.

    Why: GET /jobs/{id} is THE polling route; selecting the row and its queue position in
    one statement keeps it to one query (served by ix_jobs_queue_status_pk). Built once:
    a fresh ``aliased(Job)`` per request costs more CPU than the query itself.
    """
    ahead = aliased(Job)
    count = (
        select(func.count())
        .select_from(ahead)
        .where(ahead.queue == Job.queue, ahead.status == QUEUED, ahead.pk < Job.pk)
        .correlate(Job)
        .scalar_subquery()
    )
    return case((Job.status == QUEUED, count), else_=None)


def queue_position(session: Session, job: Job) -> int | None:
    """Queued jobs ahead of this one in its queue (0 = next); None when not queued."""
    known = getattr(job, "_queue_position", _UNSET)
    if known is not _UNSET:
        return cast(int | None, known)
    if job.status != QUEUED:
        return None
    return session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.queue == job.queue, Job.status == QUEUED, Job.pk < job.pk)
    ).scalar_one()


_UNSET = object()


def forget_missing_checkpoints(session: Session, job_id: str) -> list[int]:
    """Delete the job's checkpoint rows whose folder is gone (training keeps only the
    last ``n_checkpoints`` and the best on disk), so the list shows what exists.
    Returns the steps forgotten."""
    rows = session.execute(select(Checkpoint).where(Checkpoint.job_id == job_id)).scalars()
    gone = [c for c in rows if not Path(c.path).is_dir()]
    for c in gone:
        session.delete(c)
    session.commit()
    return [c.step for c in gone]
