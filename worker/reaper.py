"""The reaper: jobs whose worker died go back on the queue and resume from a checkpoint.

Why a thread inside every worker (not celery beat): beat is one more process to deploy
and keep singular; here every worker runs the loop and the guarded UPDATE in
``api.jobstate.requeue_stale`` lets exactly one of them win each stale job. The embedded
``finegates serve`` gets it for free because it runs a worker.

Why needed even with ``acks_late``: neither embedded kombu transport restores the
message of a SIGKILLed worker, and Redis only does after the (deliberately huge)
visibility timeout. The heartbeat is the fast, broker-independent signal.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.db.session import session_scope
from api.queue import Publish, publish

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger(__name__)


def _publish_reaped(
    settings: Settings,
    session_factory: sessionmaker[Session],
    send: Publish,
    job_id: str,
    queue: str,
) -> bool:
    """Publish one requeued job; a failure is recorded (the sweep retries it), never raised,
    so one unreachable broker call cannot skip the rest of the pass."""
    try:
        send(job_id, queue)
        return True
    except Exception as exc:
        log.warning("reaper: publishing job %s failed (%s); the sweep retries it", job_id, exc)
        try:
            with session_scope(session_factory) as s:
                jobstate.note_publish_failed(
                    s, job_id, _broker_error(exc), float(settings.queue_give_up_s)
                )
        except Exception:
            log.exception("reaper: could not record the failed publish of %s", job_id)
        return False


def _broker_error(exc: BaseException) -> str:
    return f"broker unreachable: {type(exc).__name__}"


def reap_once(
    settings: Settings,
    session_factory: sessionmaker[Session],
    enqueue: Publish | None = None,
) -> list[jobstate.ReapedJob]:
    """One pass: stale running jobs -> queued (re-published) / failed / cancelled."""
    with session_scope(session_factory) as s:
        reaped = jobstate.requeue_stale(
            s, float(settings.heartbeat_timeout_s), int(settings.job_max_attempts)
        )
    send = enqueue or partial(publish, settings=settings)
    for r in reaped:
        log.warning("reaper: job %s -> %s", r.job_id, r.status)
        if r.status == jobstate.QUEUED:
            _publish_reaped(settings, session_factory, send, r.job_id, r.queue)
    return reaped


@dataclass
class SweepResult:
    republished: list[str] = field(default_factory=list)
    failed_publish: list[str] = field(default_factory=list)
    gave_up: list[str] = field(default_factory=list)


def sweep_queued(
    settings: Settings,
    session_factory: sessionmaker[Session],
    queues: Iterable[str],
    enqueue: Publish | None = None,
    *,
    after_s: float | None = None,
) -> SweepResult:
    """Re-publish queued jobs that may have no live message (see
    ``jobstate.due_for_publish``); fail those whose publish has kept failing for
    ``queue_give_up_s``. Every job is tried even when some fail.

    Why periodic and not only at worker start: a publish that failed at creation (broker
    down through the retries), a broker restart without persistence, or a failed
    re-enqueue would otherwise wait for some worker to restart.
    """
    send = enqueue or partial(publish, settings=settings)
    bound = float(settings.queue_republish_after_s if after_s is None else after_s)
    out = SweepResult()
    with session_scope(session_factory) as s:
        due = jobstate.due_for_publish(s, queues, bound)
    for job in due:
        try:
            with session_scope(session_factory) as s:
                if not jobstate.take_publish(s, job):
                    continue  # another worker's sweep has it, or it left the queue
            try:
                send(job.job_id, job.queue)
            except Exception as exc:
                with session_scope(session_factory) as s:
                    status = jobstate.note_publish_failed(
                        s, job.job_id, _broker_error(exc), float(settings.queue_give_up_s)
                    )
                (out.gave_up if status == jobstate.FAILED else out.failed_publish).append(
                    job.job_id
                )
                continue
            if job.failed_since is not None:
                with session_scope(session_factory) as s:
                    jobstate.note_published(s, job.job_id)
            out.republished.append(job.job_id)
        except Exception:  # the database went away mid-pass: the next pass retries
            log.exception("queue sweep: job %s", job.job_id)
    if out.republished or out.failed_publish or out.gave_up:
        log.info(
            "queue sweep: re-published %d, publish failed %d, gave up %d",
            len(out.republished),
            len(out.failed_publish),
            len(out.gave_up),
        )
    return out


def republish_queued(
    settings: Settings,
    session_factory: sessionmaker[Session],
    queues: Iterable[str],
    enqueue: Publish | None = None,
) -> list[str]:
    """At worker start: publish every queued job of ``queues`` now (the sweep with no
    wait), for jobs whose broker store was wiped while no worker ran."""
    return sweep_queued(settings, session_factory, queues, enqueue, after_s=0.0).republished


def reaper_interval(settings: Settings) -> float:
    return max(0.5, min(30.0, float(settings.heartbeat_timeout_s) / 3.0))


class Reaper(threading.Thread):
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        queues: Iterable[str] = ("cpu", "gpu"),
        enqueue: Publish | None = None,
        republish: bool = True,
    ):
        super().__init__(name="finegates-reaper", daemon=True)
        self.settings = settings
        self.session_factory = session_factory
        self.queues = list(queues)
        self.enqueue: Publish = enqueue or partial(publish, settings=settings)
        self.republish = republish
        self.interval = reaper_interval(settings)
        self.stop_event = threading.Event()

    def run(self) -> None:
        if self.republish:
            try:
                republish_queued(self.settings, self.session_factory, self.queues, self.enqueue)
            except Exception:
                log.exception("reaper: re-publishing queued jobs failed")
        while not self.stop_event.is_set():
            self.run_once()
            self.stop_event.wait(self.interval)

    def run_once(self) -> None:
        try:
            reap_once(self.settings, self.session_factory, self.enqueue)
        except Exception:  # database briefly away: try again next round
            log.exception("reaper pass failed")
        try:
            sweep_queued(self.settings, self.session_factory, self.queues, self.enqueue)
        except Exception:
            log.exception("queue sweep failed")


_reaper: Reaper | None = None


def start_reaper(
    settings: Settings,
    session_factory: sessionmaker[Session],
    queues: Iterable[str] = ("cpu", "gpu"),
) -> Reaper:
    global _reaper
    if _reaper is None or not _reaper.is_alive():
        _reaper = Reaper(settings, session_factory, queues)
        _reaper.start()
    return _reaper


def stop_reaper() -> None:
    """Signal-handler safe: only sets an event (the thread is a daemon)."""
    if _reaper is not None:
        _reaper.stop_event.set()
