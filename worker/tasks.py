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

import errno
import fcntl
import gc
import logging
import os
import secrets
import shutil
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
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.db.models import Checkpoint, File, FineTunedModel, Job, utcnow
from api.db.session import make_sessionmaker, session_scope
from api.limits import fair_share_pick
from api.model_ids import checkpoint_model_id, fine_tuned_model_id
from api.queue import TASK_RUN_JOB, Publish, publish
from api.redact import internal_error_message, reference_id, scrub
from api.storage import LocalStorage
from worker.callback import JobCallback, JobLost, StopRequested, Watchdog

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


# A worker whose job thread is hung ends its process with this code (its supervisor, the
# container's restart policy or `finegates serve`, starts a fresh one).
EXIT_HUNG = 75


class RunDirLock:
    """An exclusive lock on a job's run directory, held for a whole delivery.

    The fence that does not rely on timing: the database says who owns the job, this
    says who may write its files. A worker that claims a job a stale (but still living)
    worker held waits here until that one has noticed it lost the job and let go, or its
    process has died (the kernel drops the lock). ``flock`` on a file beside the run
    directory: local disks and shared volumes on one host; on NFS it needs lock support.
    """

    def __init__(self, run_dir: Path):
        self.path = run_dir.with_name(run_dir.name + ".lock")
        self._fd: int | None = None

    def acquire(self, wait_s: float, *, touch: Any = None) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    return False
                if touch is not None:
                    touch()
                time.sleep(0.2)
                continue
            self._fd = fd
            return True

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
        phase = (data or {}).get("phase")
        if phase:  # a phase opens: progress.phase and its ETA go out with this event
            cb.set_phase(str(phase), (data or {}).get("eta_seconds"))
            cb.add_event(scrub(event.message), level=event.level, data=data or None)
            cb.flush()
            return
        cb.add_event(scrub(event.message), level=event.level, data=data or None)
        if event.level != "error":
            cb.alive()
            cb.beat()
            # between phases: a cancel or the time limit stops packaging (the staging
            # folder is removed), and a job that left this worker publishes nothing
            cb.check_stop()
            cb.before_write("artifact")

    try:
        result = build_artifact(run_dir, artifact_dir, on_event=record)
    except PruningError as exc:
        if _disk_full(exc.__cause__):
            raise exc.__cause__ from None  # type: ignore[misc]  # the task says what ran out
        raise PruningError(
            f"{exc.message}; training finished and its result is kept, so retrying the job "
            "only prunes again"
        ) from exc
    return {"pruned": True, "formats": ["tar", *result.formats], **result.summary()}


def _remove_stale_staging(artifact_dir: Path) -> None:
    """Staging folders a killed delivery left beside the artifact (hidden, never served).
    Safe: this delivery holds the job's run-directory lock, so no other writer of this
    job's artifact is alive."""
    for p in artifact_dir.parent.glob(f".{artifact_dir.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _package_checkpoints(
    job: Job,
    run_dir: Path,
    settings: Settings,
    factory: sessionmaker[Session],
    cb: JobCallback,
    main_rel: Path,
    main_summary: dict[str, Any],
) -> list[dict[str, Any]]:
    """Each checkpoint still on disk as a usable model: pruned now (no ONNX, no report)
    into ``artifacts/<job>.ckpt-step-N``; the one the final model came from shares the
    model's artifact. Returns the models rows to register with the job's success. A
    checkpoint that cannot be pruned is dropped from the list with a warning."""
    from core.errors import FineGatesError
    from core.package import build_checkpoint_artifact
    from core.rundir import RunDir

    with session_scope(factory) as s:
        jobstate.forget_missing_checkpoints(s, job.id)
        ckpts = [
            (c.id, c.step, c.path)
            for c in s.execute(
                select(Checkpoint).where(Checkpoint.job_id == job.id).order_by(Checkpoint.step)
            ).scalars()
        ]
    if not ckpts:
        return []
    final_step = RunDir(run_dir).read_final_info()[1].get("step")
    todo = [c for c in ckpts if c[1] != final_step]
    if todo:
        cb.set_phase("pruning")
        cb.add_event(f"Pruning {len(todo)} checkpoint(s) so each can be downloaded and served")
        cb.flush()
    out = []
    for ck_id, step, path in ckpts:
        model_id = checkpoint_model_id(job.model, job.suffix, job.id, step)
        if step == final_step:
            summary = {**main_summary, "checkpoint_step": step, "same_as": "final model"}
            out.append({"id": model_id, "artifact_dir": str(main_rel), "summary": summary})
            continue
        rel = main_rel.with_name(f"{main_rel.name}.ckpt-step-{step}")
        try:
            res = build_checkpoint_artifact(run_dir, path, settings.data_path / rel)
        except (FineGatesError, OSError, RuntimeError, ValueError) as exc:
            log.warning("job %s: checkpoint %s could not be pruned", job.id, step, exc_info=True)
            cb.add_event(
                f"Checkpoint at step {step} could not be pruned ({type(exc).__name__}); "
                "it is not listed",
                level="warning",
            )
            with session_scope(factory) as s:
                s.execute(delete(Checkpoint).where(Checkpoint.id == ck_id))
                s.commit()
            continue
        summary = {**res.summary(), "checkpoint_step": step}
        out.append({"id": model_id, "artifact_dir": str(rel), "summary": summary})
    return out


def _register_checkpoints(
    factory: sessionmaker[Session], job: Job, models: list[dict[str, Any]]
) -> None:
    """The checkpoints' models rows (after the job's own, which finish_succeeded wrote)."""
    if not models:
        return
    with session_scope(factory) as s:
        known = set(
            s.execute(
                select(FineTunedModel.id).where(FineTunedModel.id.in_([m["id"] for m in models]))
            ).scalars()
        )
        for m in models:
            if m["id"] in known:
                continue
            s.add(
                FineTunedModel(
                    id=m["id"],
                    tenant_id=job.tenant_id,
                    job_id=job.id,
                    base_model=job.model,
                    task=job.task,
                    artifact_dir=m["artifact_dir"],
                    summary=m["summary"],
                )
            )
        s.commit()


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
    on_hung: Any = None,
) -> JobOutcome:
    """Run one delivery of ``job_id`` to its end (or to a clean stop).

    ``on_hung(reason)``: what the watchdog calls after taking the job from a hung thread
    (the Celery task ends the process; None leaves the thread to finish on its own, its
    writes fenced off)."""
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

    # The time limit counts from the FIRST start: a requeued delivery must not get a
    # fresh max_job_seconds.
    used = (utcnow() - job.started_at).total_seconds() if job.started_at is not None else 0.0
    cb = JobCallback(
        factory,
        job_id,
        me,
        deadline=time.monotonic() + float(settings.max_job_seconds) - max(0.0, used),
        shutdown=shutdown,
        lost_after_s=float(settings.heartbeat_timeout_s),
    )
    queue = job.queue
    send = enqueue or (lambda jid, q: publish(jid, q, settings=settings))
    watchdog = Watchdog(
        cb,
        heartbeat_interval(settings),
        progress_timeout_s=float(settings.progress_timeout_s),
        stop_grace_s=float(settings.stop_grace_s),
        max_attempts=int(settings.job_max_attempts),
        on_hung=on_hung,
        republish=lambda jid: send(jid, queue),
    )
    watchdog.start()
    lock = RunDirLock(run_dir)
    try:
        # long enough for a stale holder to notice it lost the job, or for its watchdog
        # to end its process
        wait = (
            max(settings.progress_timeout_s, settings.heartbeat_timeout_s) + settings.stop_grace_s
        )
        if not lock.acquire(float(wait), touch=cb.alive):
            with session_scope(factory) as s:
                status = jobstate.give_up_running(
                    s,
                    job_id,
                    me,
                    reason="The run directory stayed locked by another worker process",
                    max_attempts=int(settings.job_max_attempts),
                )
            if status == jobstate.QUEUED:
                send(job_id, queue)
            return JobOutcome("requeued", "run directory locked")
        run_dir.mkdir(parents=True, exist_ok=True)
        return _run_claimed(job, run_dir, settings, factory, storage, cb, me, enqueue)
    finally:
        watchdog.stop()
        lock.release()
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
    stage = "training (writing a checkpoint or the trained state)"
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
        # a cancel seen while the job waited for its run directory (a shutdown instead
        # stops at the first step, so the next worker finds a checkpoint)
        cb.check_stop(shutdown=False)
        result = train(config, run_dir, cb, resume=True)
        cb.flush()
        if cb.stop_reason is not None:
            return _stopped(job_id, cb, factory, me, enqueue, settings)

        # train() leaves measured_sparsity None only when stopped before any evaluation
        sparsity = float(cast(float, result.measured_sparsity))
        target = (job.hyperparameters or {}).get("target_sparsity")
        if target is None:
            target = job.target_sparsity
        reached = "reached" if result.target_reached else "MISSED"
        aim = f", target {float(target):.3f} {reached}" if target is not None else ""
        cb.add_event(
            f"Training finished ({result.status}) after {result.steps} steps; measured "
            f"sparsity {sparsity:.3f}{aim}",
            level="info" if result.target_reached else "warning",
        )
        artifact_rel = Path("artifacts") / job_id
        cb.check_stop()
        cb.before_write("artifact")
        stage = "writing the model artifact"
        _remove_stale_staging(settings.data_path / artifact_rel)
        summary = _package(run_dir, settings.data_path / artifact_rel, cb)
        summary.setdefault("measured_sparsity", sparsity)
        summary["target_sparsity"] = target
        summary.setdefault("target_reached", bool(result.target_reached))
        checkpoints = _package_checkpoints(
            job, run_dir, settings, factory, cb, artifact_rel, summary
        )
        for warning in summary.get("warnings") or []:
            cb.add_event(warning, level="warning")
        cb.flush()
        if cb.stop_reason is not None:  # cancelled or reaped while pruning
            return _stopped(job_id, cb, factory, me, enqueue, settings)

        ft_id = fine_tuned_model_id(job.model, job.suffix, job_id)
        done = f"Job succeeded; model {ft_id} is ready"
        if summary.get("summary"):
            done += f". {summary['summary']}"
        if summary.get("target_reached") is False:
            done += " Target sparsity NOT reached (see the warnings)."
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
                message=done,
            )
        if not ok:
            return JobOutcome("lost", "the job left this worker before it could finish")
        _register_checkpoints(factory, job, checkpoints)
        return JobOutcome("succeeded", ft_id, {"summary": summary, "steps": result.steps})
    except StopRequested:
        cb.flush()
        return _stopped(job_id, cb, factory, me, enqueue, settings)
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
    except Exception as exc:
        if not _disk_full(exc):
            return _internal_error(job_id, exc, cb, factory, me)
        # A real disk-full: every writer (checkpoint, final/, artifact) writes into a
        # temporary name first, so nothing half-written is left under a real name.
        log.error("job %s: disk full while %s: %s", job_id, stage, exc)
        cb.flush()
        with session_scope(factory) as s:
            jobstate.finish_failed(
                s,
                job_id,
                "disk_full",
                f"the server ran out of disk space (No space left on device) while {stage}; "
                "nothing half-written was kept. Retry the job once space is freed",
                None,
                worker_id=me,
            )
        return JobOutcome("failed", "disk_full")


def _disk_full(exc: BaseException | None) -> bool:
    """ENOSPC / EDQUOT anywhere in the chain (safetensors reports it as its own error
    type, with the OS message)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _internal_error(
    job_id: str, exc: BaseException, cb: JobCallback, factory: sessionmaker[Session], me: str
) -> JobOutcome:
    # The traceback and the exception text go to the server log only; the tenant gets a
    # message written for them and the reference to find it there.
    ref = reference_id()
    log.error("job %s failed with an internal error (%s)", job_id, ref, exc_info=exc)
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


def _exit_hung(reason: str) -> None:
    """The watchdog took the job from a thread that will not stop: end this worker process
    (its supervisor starts a fresh one; the job, already requeued or finished, is safe)."""
    log.critical("job thread hung (%s); the worker process exits with %d", reason, EXIT_HUNG)
    logging.shutdown()
    os._exit(EXIT_HUNG)


@shared_task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> str:
    if SHUTDOWN.is_set():
        # This worker is stopping (it may just have released this very job): put the
        # message back untouched for the next worker instead of claiming it again.
        raise Reject("worker shutting down", requeue=True)
    outcome = execute_job(job_id, on_hung=_exit_hung)
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
