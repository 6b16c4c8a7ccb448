"""The engine callback the worker hands to ``core.train.train``.

Why batching: a step can take milliseconds on a tiny model, and one UPDATE + INSERT per
step from every worker would flood Postgres (and lock SQLite). Records are buffered and
written in ONE transaction (``api.jobstate.record_progress``) at most every
``flush_interval_s`` or every ``flush_max_records`` records, and always on the first step
of a delivery (a poller sees the job training as soon as it is, not up to
``flush_interval_s`` later), on an evaluation, a checkpoint and at the end. That write
doubles as the job's heartbeat and brings back the cancel flag, so cancelling costs no
extra query.

The callback returns ``False`` (stop cleanly, after a checkpoint) when:
- the job's ``cancel_requested`` flag is set            -> stop_reason "cancelled"
- the worker is shutting down (Ctrl-C, SIGTERM)          -> stop_reason "shutdown"
- the job ran past ``max_job_seconds``                   -> stop_reason "timeout"

When the row no longer belongs to this worker (reaped and maybe already claimed by
another worker), stop_reason is "lost" and the callback RAISES ``JobLost`` instead: a
clean stop would write a "stop" checkpoint and prune old ones in the run directory the
new owner is using. ``core.train.train`` lets callback exceptions through without
writing anything, and the task ends the delivery without touching the row or the disk.

``before_write`` is the fence the engine calls before every checkpoint and ``final/``
(and the task before packaging): the database must confirm the job is still this
worker's. The ``Watchdog`` (the job's side thread) beats only while the job's thread
makes progress and enforces a stall, an ignored cancel and the time limit from outside.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.db.models import utcnow
from api.db.session import session_scope
from core.callbacks import CheckpointRecord, EvalRecord, StepRecord
from core.gatemap import METRICS_KEY as GATES_KEY

log = logging.getLogger(__name__)

# Past this many unwritten records (database unreachable), the oldest train points are
# dropped so a long outage cannot eat the worker's memory; evals and events are kept.
_MAX_BUFFER = 10_000


class JobLost(Exception):
    """This worker no longer owns the job: stop at once, write nothing (see module doc)."""


class StopRequested(Exception):
    """Raised at a task stage boundary when the job must stop (``args[0]``: the reason)."""


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


class JobCallback:
    """Buffers progress for one job and writes it to the database in batches."""

    def __init__(
        self,
        session_factory: sessionmaker[Session],
        job_id: str,
        worker_id: str,
        *,
        flush_interval_s: float = 2.0,
        flush_max_records: int = 50,
        deadline: float | None = None,
        shutdown: threading.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        lost_after_s: float = 300.0,
    ):
        self.session_factory = session_factory
        self.job_id = job_id
        self.worker_id = worker_id
        self.flush_interval_s = flush_interval_s
        self.flush_max_records = flush_max_records
        self.deadline = deadline
        self.shutdown = shutdown
        self.clock = clock
        self.stop_reason: str | None = None
        self.last_step: StepRecord | None = None
        self.flushes = 0
        self._metrics: list[dict[str, Any]] = []
        self._events: list[dict[str, Any]] = []
        self._measured: float | None = None
        self._last_eval: EvalRecord | None = None
        # the part of the job under way; after training, core.package's phases, each
        # with its own expected end (None: the training ETA applies)
        self.phase = "training"
        self.phase_finish: datetime | None = None
        self._steps_seen = 0
        self._last_flush = clock()
        self._lock = threading.Lock()
        # Liveness: when the job's own thread last made progress (a step, an evaluation,
        # a checkpoint, a packaging phase, a stage boundary); the watchdog reads it.
        self.progress_at = clock()
        # When the database last confirmed this worker owns the job.
        self.owned_at = clock()
        self.stop_seen_at: float | None = None  # when stop_reason was first set
        # Longest the run directory may be written without confirming ownership (the
        # reaper's heartbeat timeout: past it, another worker may hold the job).
        self.lost_after_s = lost_after_s

    # --- engine protocol -------------------------------------------------------------

    def alive(self) -> None:
        """The job's thread made progress (called by the engine callbacks and the task)."""
        self.progress_at = self.clock()

    def on_step(self, record: StepRecord) -> bool | None:
        self.alive()
        with self._lock:
            self.last_step = record
            if record.measured_sparsity is not None:
                self._measured = _finite(record.measured_sparsity)
            # ``loss`` is the task loss, as in OpenAI's metrics; the sparsity penalty
            # (lambda x the sparsity term) and the total the optimizer sees are apart.
            self._metrics.append(
                {
                    "kind": "train",
                    "step": int(record.step),
                    "loss": _finite(record.task_loss),
                    "lr": _finite(record.lr),
                    "measured_sparsity": _finite(record.measured_sparsity),
                    "metrics": {
                        "train_loss": _finite(record.task_loss),
                        "task_loss": _finite(record.task_loss),
                        "sparsity_penalty": _finite(record.loss - record.task_loss),
                        "sparsity_loss": _finite(record.sparsity_loss),
                        "total_loss": _finite(record.loss),
                        "examples_per_second": _finite(record.examples_per_second),
                    },
                    "created_at": utcnow(),
                }
            )
            due = (
                self._steps_seen == 0
                or len(self._metrics) >= self.flush_max_records
                or self.clock() - self._last_flush >= self.flush_interval_s
            )
            self._steps_seen += 1
        if due:
            self.flush(step_event=True)
        return self._go_on()

    def on_eval(self, record: EvalRecord) -> bool | None:
        self.alive()
        with self._lock:
            self._last_eval = record
            self._measured = _finite(record.measured_sparsity)
            metrics = {k: _finite(v) for k, v in record.metrics.items()}
            self._metrics.append(
                {
                    "kind": "eval",
                    "step": int(record.step),
                    "loss": metrics.get("eval_loss"),
                    "lr": None,
                    "measured_sparsity": self._measured,
                    # the gate map rides on the eval point; GET .../gates serves it
                    "metrics": {**metrics, GATES_KEY: record.gates} if record.gates else metrics,
                    "created_at": utcnow(),
                }
            )
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()) if v is not None)
            best = " (best so far)" if record.is_best else ""
            self._events.append(
                {
                    "message": (
                        f"Step {record.step}/{record.total_steps}: eval {shown}; measured "
                        f"sparsity {record.measured_sparsity:.3f}{best}"
                    ),
                    "type": "metrics",
                    "data": {
                        "step": record.step,
                        "metrics": metrics,
                        "measured_sparsity": self._measured,
                        "sparsity_by_type": record.sparsity_by_type,
                        "removable_params": record.removable_params,
                        "gated_params": record.gated_params,
                        "is_best": record.is_best,
                    },
                    "created_at": utcnow(),
                }
            )
        self.flush()
        return self._go_on()

    def on_checkpoint(self, record: CheckpointRecord) -> bool | None:
        self.alive()
        self.flush()
        metrics = self._checkpoint_metrics(record)
        if self.stop_reason == "lost":
            self._go_on()  # raises JobLost: the row is another worker's now
        try:
            with session_scope(self.session_factory) as s:
                if jobstate.add_checkpoint(
                    s, self.job_id, int(record.step), record.path, metrics, worker_id=self.worker_id
                ):
                    jobstate.forget_missing_checkpoints(s, self.job_id)
        except Exception:  # a lost row must not kill training; the files are on disk
            log.exception(
                "job %s: could not record checkpoint at step %s", self.job_id, record.step
            )
        return self._go_on()

    def before_write(self, what: str) -> None:
        """The fence before every write into the run directory or the artifact (the
        engine calls it before a checkpoint and final/, the task before packaging).

        The database must confirm that this worker still owns the job. While it cannot
        be reached the worker PAUSES here (it writes nothing it may not own) and resumes
        when it answers; past ``lost_after_s`` without a confirmation the job may be
        another worker's, so this raises ``JobLost``. A refusal raises ``JobLost`` at once.
        """
        delay = 0.2
        while True:
            if self.stop_reason == "lost":
                self._go_on()
            self.alive()  # waiting on the database is not a hung thread
            try:
                with session_scope(self.session_factory) as s:
                    ok = jobstate.owns(s, self.job_id, self.worker_id)
            except Exception as exc:
                waited = self.clock() - self.owned_at
                if waited > self.lost_after_s:
                    self._set_stop("lost")
                    raise JobLost(
                        f"job {self.job_id}: ownership not confirmed for {waited:.0f}s "
                        f"(database unreachable: {type(exc).__name__}); not writing {what}"
                    ) from exc
                log.warning(
                    "job %s: database unreachable before writing %s; pausing", self.job_id, what
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if not ok:
                self._set_stop("lost")
                self._go_on()
            self.owned_at = self.clock()
            return

    def _set_stop(self, reason: str) -> None:
        if reason == "lost" or self.stop_reason is None:
            self.stop_reason = reason
        if self.stop_seen_at is None:
            self.stop_seen_at = self.clock()

    def _checkpoint_metrics(self, record: CheckpointRecord) -> dict[str, float | None]:
        """OpenAI's checkpoint metrics (step, train_loss, valid_loss) for THIS step, plus
        the task metrics and measured sparsity of its evaluation. (The engine's record
        carries the best evaluation so far, which may be another step's.)"""
        last, ev = self.last_step, self._last_eval
        out: dict[str, float | None] = {"step": float(record.step)}
        if last is not None and last.step == record.step:
            out["train_loss"] = _finite(last.task_loss)
        vals = (
            {k: _finite(v) for k, v in ev.metrics.items()}
            if ev is not None and ev.step == record.step
            else {}  # a stop checkpoint between evaluations has no evaluation of its own
        )
        if "eval_loss" in vals:
            out["valid_loss"] = out["full_valid_loss"] = vals.pop("eval_loss")
        out.update(vals)
        if record.measured_sparsity is not None:
            out["measured_sparsity"] = _finite(record.measured_sparsity)
        return out

    def set_phase(self, phase: str, eta_seconds: float | None = None) -> None:
        """Packaging moved on to ``phase``; the next flush writes it with its ETA."""
        with self._lock:
            self.phase = phase
            self.phase_finish = (
                utcnow() + timedelta(seconds=float(eta_seconds))
                if eta_seconds is not None
                else utcnow()
            )

    # --- writing -----------------------------------------------------------------------

    def add_event(self, message: str, level: str = "info", data: dict | None = None) -> None:
        """Queue a message event; it goes out with the next flush."""
        with self._lock:
            self._events.append(
                {"message": message, "level": level, "data": data, "created_at": utcnow()}
            )

    def flush(self, *, step_event: bool = False, blocking: bool = True) -> bool:
        """Write buffered records + progress + heartbeat in one transaction.

        Returns False when nothing was written (another thread is flushing and
        ``blocking`` is False, or the database refused; records stay buffered).
        """
        if not self._lock.acquire(blocking=blocking):
            return False
        try:
            metrics, events = self._metrics, self._events
            last = self.last_step
            if step_event and last is not None:
                events = [
                    *events,
                    {
                        "message": (
                            f"Step {last.step}/{last.total_steps}: train loss (task) "
                            f"{last.task_loss:.4f}, sparsity penalty "
                            f"{last.loss - last.task_loss:.4f}, total {last.loss:.4f}"
                            + (
                                f"; measured sparsity {self._measured:.3f}"
                                if self._measured is not None
                                else ""
                            )
                        ),
                        "type": "metrics",
                        "data": {
                            "step": last.step,
                            "total_steps": last.total_steps,
                            "train_loss": _finite(last.task_loss),
                            "sparsity_penalty": _finite(last.loss - last.task_loss),
                            "total_loss": _finite(last.loss),
                            "lr": _finite(last.lr),
                        },
                        "created_at": utcnow(),
                    },
                ]
            eta = _finite(last.eta_seconds) if last is not None else None
            finish = (
                self.phase_finish
                if self.phase != "training"
                else (utcnow() + timedelta(seconds=eta) if eta is not None else None)
            )
            try:
                with session_scope(self.session_factory) as s:
                    ack = jobstate.record_progress(
                        s,
                        self.job_id,
                        self.worker_id,
                        step=int(last.step) if last is not None else None,
                        total_steps=int(last.total_steps) if last is not None else None,
                        trained_tokens=int(last.tokens)
                        if last is not None and last.tokens
                        else None,
                        estimated_finish=finish,
                        measured_sparsity=self._measured,
                        events=events,
                        metrics=metrics,
                        phase=self.phase,
                    )
            except Exception:
                log.exception("job %s: progress write failed; keeping records", self.job_id)
                if len(self._metrics) > _MAX_BUFFER:
                    keep = [m for m in self._metrics if m["kind"] == "eval"]
                    self._metrics = keep + self._metrics[-_MAX_BUFFER // 2 :]
                return False
            self._metrics, self._events = [], []
            self._last_flush = self.clock()
            self.flushes += 1
            if not ack.owned:
                self._set_stop("lost")  # overrides cancel/shutdown: nothing is ours to write
            else:
                self.owned_at = self._last_flush
                if ack.cancel_requested and self.stop_reason is None:
                    self._set_stop("cancelled")
            return True
        finally:
            self._lock.release()

    def beat(self) -> None:
        """Heartbeat from the side thread: a flush that never waits on the training thread."""
        self.flush(blocking=False)

    def check_stop(self, *, shutdown: bool = True) -> None:
        """At a stage boundary of the task (before training, between packaging phases):
        raise ``StopRequested`` when the job should stop (cancel, time limit, and with
        ``shutdown`` a worker shutdown), ``JobLost`` when it is no longer ours."""
        self.alive()
        if not shutdown and self.stop_reason is None:
            if self.deadline is None or self.clock() <= self.deadline:
                return
        if self._go_on() is False:
            raise StopRequested(str(self.stop_reason))

    # --- stopping ----------------------------------------------------------------------

    def _go_on(self) -> bool | None:
        if self.stop_reason == "lost":
            raise JobLost(f"job {self.job_id} no longer belongs to worker {self.worker_id}")
        if self.stop_reason is None:
            if self.shutdown is not None and self.shutdown.is_set():
                self._set_stop("shutdown")
            elif self.deadline is not None and self.clock() > self.deadline:
                self._set_stop("timeout")
        return False if self.stop_reason is not None else None


# What the watchdog does with a job whose thread will not stop: record why, hand the job
# on, then ``on_hung(reason)`` (the Celery task's: end the worker process, whose
# supervisor starts a fresh one; a Python thread cannot be killed any other way).
HungHandler = Callable[[str], None]


class Watchdog(threading.Thread):
    """The job's side thread: the heartbeat, and the limits the job's thread cannot dodge.

    - Heartbeat: a flush every ``interval_s``, but only while the job's thread is making
      progress (``JobCallback.progress_at`` younger than ``progress_timeout_s``): a hung
      thread's heartbeat goes stale, so the reaper (on the database's clock) takes the job
      even if this process is wedged too.
    - Stalled past ``progress_timeout_s``: the job leaves this worker (requeued, or failed
      ``job_stalled`` at the attempt limit; ``jobstate.give_up_running``), then ``on_hung``.
    - A cancel, a time limit or a lost job that the thread has not honoured within
      ``stop_grace_s`` (it is stuck in data loading, tokenization, a long step, ...): the
      job is finished as cancelled / failed ``job_timeout`` (a lost one is left alone),
      then ``on_hung``.

    It dies with the process, so a SIGKILLed worker stops beating and the reaper notices.
    """

    def __init__(
        self,
        callback: JobCallback,
        interval_s: float,
        *,
        progress_timeout_s: float = float("inf"),
        stop_grace_s: float = float("inf"),
        max_attempts: int = 3,
        on_hung: HungHandler | None = None,
        republish: Callable[[str], None] | None = None,
    ):
        super().__init__(name=f"watchdog-{callback.job_id}", daemon=True)
        self.callback = callback
        self.interval_s = interval_s
        self.progress_timeout_s = progress_timeout_s
        self.stop_grace_s = stop_grace_s
        self.max_attempts = max_attempts
        self.on_hung = on_hung
        self.republish = republish
        self.fired: str | None = None  # the reason, once it acted
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                if self.check():
                    return
            except Exception:  # never let the side thread die silently mid-job
                log.exception("watchdog for job %s failed", self.callback.job_id)

    def check(self) -> bool:
        """One round; True once it has acted (the thread then ends)."""
        cb = self.callback
        now = cb.clock()
        stalled = now - cb.progress_at
        if stalled > self.progress_timeout_s:
            return self._act(
                "stalled",
                f"The training thread made no progress for {stalled:.0f}s "
                f"(limit FINEGATES_PROGRESS_TIMEOUT_S={self.progress_timeout_s:.0f}s)",
            )
        cb.beat()
        if cb.stop_reason is None and cb.deadline is not None and now > cb.deadline:
            cb._set_stop("timeout")
        if cb.stop_reason is not None and cb.stop_seen_at is not None:
            if now - cb.stop_seen_at > self.stop_grace_s:
                return self._act(
                    cb.stop_reason,
                    f"The job's thread did not stop within {self.stop_grace_s:.0f}s of "
                    f"'{cb.stop_reason}'",
                )
        return False

    def _act(self, reason: str, message: str) -> bool:
        cb = self.callback
        self.fired = reason
        log.error("job %s: %s; taking it from this worker", cb.job_id, message)
        status: str | None = None
        try:
            status = self._record(reason, message)
        except Exception:  # database away: the stale heartbeat lets the reaper do it
            log.exception("job %s: could not record the watchdog's decision", cb.job_id)
        cb._set_stop("lost")  # whatever the thread does next, it must not write
        if status == jobstate.QUEUED and self.republish is not None:
            try:
                self.republish(cb.job_id)
            except Exception:
                log.exception("job %s: re-publish failed; the queue sweep retries", cb.job_id)
        if self.on_hung is not None:
            self.on_hung(reason)
        return True

    def _record(self, reason: str, message: str) -> str | None:
        cb = self.callback
        with session_scope(cb.session_factory) as s:
            if reason in ("stalled", "shutdown"):
                return jobstate.give_up_running(
                    s, cb.job_id, cb.worker_id, reason=message, max_attempts=self.max_attempts
                )
            if reason == "cancelled":
                jobstate.finish_cancelled(s, cb.job_id, cb.worker_id, f"{message}; job cancelled")
                return jobstate.CANCELLED
            if reason == "timeout":
                jobstate.finish_failed(
                    s,
                    cb.job_id,
                    "job_timeout",
                    "the job ran longer than the service's maximum job time "
                    "(FINEGATES_MAX_JOB_SECONDS) and did not stop when asked",
                    None,
                    worker_id=cb.worker_id,
                )
                return jobstate.FAILED
        return None  # lost: the row is not ours to touch

    def stop(self) -> None:
        self._stop_event.set()
        if self is not threading.current_thread():
            self.join(timeout=10)
