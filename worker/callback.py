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
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import timedelta
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
        self._steps_seen = 0
        self._last_flush = clock()
        self._lock = threading.Lock()

    # --- engine protocol -------------------------------------------------------------

    def on_step(self, record: StepRecord) -> bool | None:
        with self._lock:
            self.last_step = record
            if record.measured_sparsity is not None:
                self._measured = _finite(record.measured_sparsity)
            self._metrics.append(
                {
                    "kind": "train",
                    "step": int(record.step),
                    "loss": _finite(record.loss),
                    "lr": _finite(record.lr),
                    "measured_sparsity": _finite(record.measured_sparsity),
                    "metrics": {
                        "task_loss": _finite(record.task_loss),
                        "sparsity_loss": _finite(record.sparsity_loss),
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
        with self._lock:
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
        self.flush()
        metrics = {k: _finite(v) for k, v in (record.metrics or {}).items()}
        if record.measured_sparsity is not None:
            metrics["measured_sparsity"] = _finite(record.measured_sparsity)
        if self.stop_reason == "lost":
            self._go_on()  # raises JobLost: the row is another worker's now
        try:
            with session_scope(self.session_factory) as s:
                jobstate.add_checkpoint(
                    s, self.job_id, int(record.step), record.path, metrics, worker_id=self.worker_id
                )
        except Exception:  # a lost row must not kill training; the files are on disk
            log.exception(
                "job %s: could not record checkpoint at step %s", self.job_id, record.step
            )
        return self._go_on()

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
                            f"Step {last.step}/{last.total_steps}: training loss={last.loss:.4f}"
                            + (
                                f", measured sparsity={self._measured:.3f}"
                                if self._measured is not None
                                else ""
                            )
                        ),
                        "type": "metrics",
                        "data": {
                            "step": last.step,
                            "total_steps": last.total_steps,
                            "train_loss": _finite(last.loss),
                            "lr": _finite(last.lr),
                        },
                        "created_at": utcnow(),
                    },
                ]
            eta = _finite(last.eta_seconds) if last is not None else None
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
                        estimated_finish=(utcnow() + timedelta(seconds=eta))
                        if eta is not None
                        else None,
                        measured_sparsity=self._measured,
                        events=events,
                        metrics=metrics,
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
                self.stop_reason = "lost"  # overrides cancel/shutdown: nothing is ours to write
            elif ack.cancel_requested and self.stop_reason is None:
                self.stop_reason = "cancelled"
            return True
        finally:
            self._lock.release()

    def beat(self) -> None:
        """Heartbeat from the side thread: a flush that never waits on the training thread."""
        self.flush(blocking=False)

    # --- stopping ----------------------------------------------------------------------

    def _go_on(self) -> bool | None:
        if self.stop_reason == "lost":
            raise JobLost(f"job {self.job_id} no longer belongs to worker {self.worker_id}")
        if self.stop_reason is None:
            if self.shutdown is not None and self.shutdown.is_set():
                self.stop_reason = "shutdown"
            elif self.deadline is not None and self.clock() > self.deadline:
                self.stop_reason = "timeout"
        return False if self.stop_reason is not None else None


class HeartbeatThread(threading.Thread):
    """Keeps the heartbeat fresh while a step, an evaluation or pruning runs long.

    It dies with the process, so a SIGKILLed worker stops beating and the reaper
    notices; a worker that is merely slow keeps its job.
    """

    def __init__(self, callback: JobCallback, interval_s: float):
        super().__init__(name=f"heartbeat-{callback.job_id}", daemon=True)
        self.callback = callback
        self.interval_s = interval_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            try:
                self.callback.beat()
            except Exception:  # never let the side thread die silently mid-job
                log.exception("heartbeat for job %s failed", self.callback.job_id)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=10)
