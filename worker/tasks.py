"""The job task: claim, train, prune, export, register the model.

Celery's rules, applied: the message carries only the job id and the task re-reads the
row; the task asserts the state itself (a guarded claim, so a duplicate or late message
is a no-op); it is idempotent under ``acks_late`` (training resumes from the run
directory's last checkpoint; ``resume=True``); cancellation is a database flag the
training callback reads, never ``revoke(terminate=True)``.

``execute_job`` is the plain function (tests and tools call it without Celery);
``run_job`` is the Celery task wrapping it.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from celery import shared_task
from celery.exceptions import Reject
from celery.signals import worker_ready, worker_shutting_down
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.db.models import File, Job, utcnow
from api.db.session import make_sessionmaker, session_scope
from api.limits import fair_share_pick
from api.queue import TASK_RUN_JOB, Publish, publish
from api.redact import internal_error_message, reference_id, scrub
from api.storage import LocalStorage
from worker.callback import HeartbeatThread, JobCallback, JobLost

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger(__name__)

# Set when the worker starts a warm shutdown (Ctrl-C / SIGTERM): the running job
# checkpoints at its next step and goes back to the queue instead of dying mid-step.
SHUTDOWN = threading.Event()

_factories: dict[str, sessionmaker[Session]] = {}
_factories_lock = threading.Lock()
_worker_id: str | None = None


def worker_identity() -> str:
    """host:pid:nonce. A restarted worker is a new identity, so its predecessor's job
    cannot be mistaken for its own."""
    global _worker_id
    if _worker_id is None or not _worker_id.split(":")[1] == str(os.getpid()):
        _worker_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    return _worker_id


def session_factory_for(settings: Settings) -> sessionmaker[Session]:
    """One engine per database URL per process (engines hold pools; never one per job)."""
    with _factories_lock:
        f = _factories.get(settings.db_url)
        if f is None:
            f = _factories[settings.db_url] = make_sessionmaker(settings)
        return f


def heartbeat_interval(settings: Settings) -> float:
    """Beat several times per timeout, but no more than every 30 s nor less than 0.5 s."""
    return max(0.5, min(30.0, float(settings.heartbeat_timeout_s) / 5.0))


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def fine_tuned_model_id(base: str, suffix: str | None, job_id: str) -> str:
    """OpenAI-style ``ft:<base>:<suffix>:<job id part>`` (``ft:<base>:<job id part>`` without
    a suffix). A base given as a folder path contributes only its last part; characters
    that would break a URL path segment become ``-``."""
    base_part = Path(base).name if ("/" in base or os.sep in base) and Path(base).name else base
    base_part = _SAFE.sub("-", base_part).strip("-") or "model"
    # the job id's whole random part (24 characters, case kept): models.id is unique
    # across tenants, so 8 characters could collide, and only once training had finished
    short = job_id.split("-", 1)[-1]
    parts = ["ft", base_part]
    if suffix:
        s = _SAFE.sub("-", suffix).strip("-")
        if s:
            parts.append(s)
    parts.append(short)
    return ":".join(parts)


@dataclass
class JobOutcome:
    """What happened to one delivery of a job (returned for tests and logs)."""

    status: str  # succeeded | failed | cancelled | requeued | lost | skipped | missing
    detail: str = ""
    data: dict[str, Any] = field(default_factory=dict)


def _file_path(s: Session, storage: LocalStorage, file_id: str | None) -> str | None:
    if not file_id:
        return None
    row = s.execute(select(File).where(File.id == file_id)).scalar_one_or_none()
    if row is None:
        from core.errors import DataError

        raise DataError(f"file {file_id} no longer exists (deleted after the job was created)")
    return str(storage.path(row.storage_key))


def _package(run_dir: Path, artifact_dir: Path, cb: JobCallback) -> dict[str, Any]:
    """Build and publish the job's artifact (core.package.build_artifact) and return the
    compression summary stored on the job and the models row.

    Every phase the pipeline reports becomes a job event. ONNX export and the latency
    report are extras (a warning event when they fail); a pruning failure raises
    ``PruningError`` (code ``pruning_failed``) and the run directory stays, so a retry
    skips training and only prunes again.
    """
    from core.errors import PruningError
    from core.package import PackageEvent, build_artifact

    def record(event: PackageEvent) -> None:
        data = dict(event.data) if event.data else None
        if data and "traceback" in data:
            # tracebacks go to the server log only; the tenant sees a reference
            ref = reference_id()
            log.error("job %s packaging %s (%s):\n%s", cb.job_id, event.phase, ref,
                      data.pop("traceback"))  # fmt: skip
            data["reference"] = ref
        cb.add_event(scrub(event.message), level=event.level, data=data or None)
        if event.level != "error":
            cb.beat()

    try:
        result = build_artifact(run_dir, artifact_dir, on_event=record)
    except PruningError as exc:
        raise PruningError(
            f"{exc.message}; training finished and its result is kept, so retrying the job "
            "only prunes again"
        ) from exc
    return {"pruned": True, "formats": ["tar", *result.formats], **result.summary()}


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def execute_job(
    job_id: str,
    *,
    settings: Settings | None = None,
    session_factory: sessionmaker[Session] | None = None,
    worker_id: str | None = None,
    shutdown: threading.Event | None = None,
    enqueue: Publish | None = None,
) -> JobOutcome:
    """Run one delivery of ``job_id`` to its end (or to a clean stop)."""
    if settings is None:
        from api.settings import get_settings

        settings = get_settings()
    factory = session_factory or session_factory_for(settings)
    me = worker_id or worker_identity()
    shutdown = shutdown if shutdown is not None else SHUTDOWN
    storage = LocalStorage(settings.storage_dir)

    with session_scope(factory) as s:
        job = s.execute(select(Job).where(Job.id == job_id)).scalar_one_or_none()
        if job is None:
            log.warning("job %s does not exist; dropping the message", job_id)
            return JobOutcome("missing")
        if job.status != jobstate.QUEUED:
            # Duplicate delivery, a job cancelled while queued, or one a live worker holds.
            return JobOutcome("skipped", job.status)
        fair = fair_share_pick(s, job)
        if fair is not None:
            # another tenant waits longer for a worker: run its job, re-publish this one
            # (its new message keeps it queued; the other job's own message is then a
            # duplicate delivery and skipped)
            _republish(job.id, job.queue, enqueue, settings)
            job_id = fair
            job = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        run_dir = Path(job.run_dir) if job.run_dir else settings.runs_dir / job.id
        if not jobstate.claim(s, job_id, me, run_dir=str(run_dir)):
            return JobOutcome("skipped", "claimed by another worker")
        job = s.execute(select(Job).where(Job.id == job_id)).scalar_one()
        s.expunge(job)

    run_dir.mkdir(parents=True, exist_ok=True)
    # The time limit counts from the FIRST start: a requeued delivery must not get a
    # fresh max_job_seconds.
    used = (utcnow() - job.started_at).total_seconds() if job.started_at is not None else 0.0
    cb = JobCallback(
        factory,
        job_id,
        me,
        deadline=time.monotonic() + float(settings.max_job_seconds) - max(0.0, used),
        shutdown=shutdown,
    )
    beat = HeartbeatThread(cb, heartbeat_interval(settings))
    beat.start()
    try:
        return _run_claimed(job, run_dir, settings, factory, storage, cb, me, enqueue)
    finally:
        beat.stop()
        _free_memory()


def _republish(job_id: str, queue: str, enqueue: Publish | None, settings: Settings) -> None:
    try:
        if enqueue is not None:
            enqueue(job_id, queue)
        else:
            publish(job_id, queue, settings=settings)
    except Exception:  # it stays queued; the reaper re-publishes queued jobs at start
        log.exception("could not re-publish %s after a fair-share swap", job_id)


def _run_claimed(
    job: Job,
    run_dir: Path,
    settings: Settings,
    factory: sessionmaker[Session],
    storage: LocalStorage,
    cb: JobCallback,
    me: str,
    enqueue: Publish | None,
) -> JobOutcome:
    from core.errors import FineGatesError

    job_id = job.id
    try:
        from core.config import JobConfig
        from core.train import train

        with session_scope(factory) as s:
            training_file = _file_path(s, storage, job.training_file)
            validation_file = _file_path(s, storage, job.validation_file)
        config = JobConfig(
            model=job.model,
            training_file=training_file or "",
            task=job.task,
            validation_file=validation_file,
            # JobConfig.validate turns the stored dict into Hyperparameters
            hyperparameters=cast(Any, dict(job.hyperparameters or {})),
            seed=job.seed,
            data_dir=str(settings.data_path),
            allow_hub=settings.allow_hub,
            allow_paths=False,  # a tenant's model id never names a server folder
        )
        result = train(config, run_dir, cb, resume=True)
        cb.flush()
        if cb.stop_reason is not None:
            return _stopped(job_id, cb, factory, me, enqueue, settings)

        # train() leaves measured_sparsity None only when stopped before any evaluation
        sparsity = float(cast(float, result.measured_sparsity))
        cb.add_event(
            f"Training finished ({result.status}) after {result.steps} steps; measured "
            f"sparsity {sparsity:.3f}"
        )
        artifact_rel = Path("artifacts") / job_id
        summary = _package(run_dir, settings.data_path / artifact_rel, cb)
        summary.setdefault("measured_sparsity", sparsity)
        target = (job.hyperparameters or {}).get("target_sparsity")
        if target is None:
            target = job.target_sparsity
        summary["target_sparsity"] = target
        cb.flush()
        if cb.stop_reason is not None:  # cancelled or reaped while pruning
            return _stopped(job_id, cb, factory, me, enqueue, settings)

        ft_id = fine_tuned_model_id(job.model, job.suffix, job_id)
        last = cb.last_step
        with session_scope(factory) as s:
            ok = jobstate.finish_succeeded(
                s,
                job_id,
                me,
                fine_tuned_model=ft_id,
                artifact_dir=str(artifact_rel),
                trained_tokens=int(last.tokens) if last is not None and last.tokens else None,
                measured_sparsity=sparsity,
                compression=summary,
            )
        if not ok:
            return JobOutcome("lost", "the job left this worker before it could finish")
        return JobOutcome("succeeded", ft_id, {"summary": summary, "steps": result.steps})
    except JobLost:
        # Reaped (and maybe claimed by another worker): no flush, no event, no status
        # change, no checkpoint; the row and the run directory are the new owner's.
        log.warning("job %s: lost to another worker; stopping without writing", job_id)
        return JobOutcome("lost", "the job was taken from this worker (stale heartbeat)")
    except FineGatesError as exc:
        cb.flush()
        info = exc.to_dict()
        if not exc.user_error:
            ref = reference_id()
            log.error("job %s failed (%s): %s", job_id, ref, exc.message, exc_info=exc)
            info["message"] = f"{info['message']} (reference {ref})"
        info["message"] = scrub(info["message"])  # engine messages may name server paths
        with session_scope(factory) as s:
            jobstate.finish_failed(
                s, job_id, info["code"], info["message"], info.get("param"), worker_id=me
            )
        return JobOutcome("failed", info["code"], info)
    except Exception:
        # The traceback and the exception text go to the server log only; the tenant
        # gets a message written for them and the reference to find it there.
        ref = reference_id()
        log.exception("job %s failed with an internal error (%s)", job_id, ref)
        cb.flush()
        message = internal_error_message(ref, "running the job")
        with session_scope(factory) as s:
            jobstate.finish_failed(s, job_id, "internal_error", message, None, worker_id=me)
        return JobOutcome("failed", "internal_error", {"message": message, "reference": ref})


def _stopped(
    job_id: str,
    cb: JobCallback,
    factory: sessionmaker[Session],
    me: str,
    enqueue: Publish | None,
    settings: Settings,
) -> JobOutcome:
    reason = cb.stop_reason
    with session_scope(factory) as s:
        if reason == "cancelled":
            step = cb.last_step.step if cb.last_step is not None else 0
            jobstate.finish_cancelled(s, job_id, me, f"Job cancelled at step {step}")
            return JobOutcome("cancelled")
        if reason == "lost":
            return JobOutcome("lost", "the job was taken from this worker (stale heartbeat)")
        if reason == "timeout":
            jobstate.finish_failed(
                s,
                job_id,
                "job_timeout",
                "the job ran longer than the service's maximum job time "
                "(FINEGATES_MAX_JOB_SECONDS)",
                None,
                worker_id=me,
            )
            return JobOutcome("failed", "job_timeout")
        # shutdown: hand the job back; it resumes from the checkpoint just written.
        released = jobstate.release(
            s, job_id, me, "Worker shutting down; job requeued to resume from its checkpoint"
        )
        row = s.execute(select(Job.queue, Job.status).where(Job.id == job_id)).one_or_none()
    if released and row is not None:
        if enqueue is not None:
            enqueue(job_id, row[0])
        else:
            publish(job_id, row[0], settings=settings)
        return JobOutcome("requeued")
    if row is not None and row[1] == jobstate.CANCELLED:
        return JobOutcome("cancelled")  # cancel requested before the shutdown: not requeued
    return JobOutcome("lost", "the job left this worker during shutdown")


@shared_task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    if SHUTDOWN.is_set():
        # This worker is stopping (it may just have released this very job): put the
        # message back untouched for the next worker instead of claiming it again.
        raise Reject("worker shutting down", requeue=True)
    outcome = execute_job(job_id)
    log.info("job %s: %s %s", job_id, outcome.status, outcome.detail)
    return outcome.status


# --- worker lifecycle -----------------------------------------------------------------


@worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Start the reaper loop and re-publish queued jobs this worker serves."""
    from api.settings import get_settings
    from worker.reaper import start_reaper

    settings = get_settings()
    try:
        queues = sorted(sender.app.amqp.queues.consume_from.keys())  # type: ignore[union-attr]
    except Exception:
        queues = ["cpu", "gpu"]
    start_reaper(settings, session_factory_for(settings), queues=queues)
    from worker.webhooks import start_dispatcher

    start_dispatcher(settings, session_factory_for(settings))  # signed job-end webhooks


@worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    SHUTDOWN.set()
    from worker.reaper import stop_reaper
    from worker.webhooks import stop_dispatcher

    stop_reaper()
    stop_dispatcher()
