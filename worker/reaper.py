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
from functools import partial
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api import jobstate
from api.db.models import Job
from api.db.session import session_scope
from api.queue import Publish, publish

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger(__name__)


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
            send(r.job_id, r.queue)
    return reaped


def republish_queued(
    session_factory: sessionmaker[Session],
    queues: Iterable[str],
    enqueue: Publish | None = None,
) -> list[str]:
    """Publish every queued job of ``queues`` again (duplicates are skipped by the claim).

    Run when a worker starts: it recovers jobs whose message never reached the broker
    (broker down at create time) or whose broker store was wiped.
    """
    with session_scope(session_factory) as s:
        rows = s.execute(
            select(Job.id, Job.queue)
            .where(Job.status == jobstate.QUEUED, Job.queue.in_(list(queues)))
            .order_by(Job.pk)
        ).all()
    send = enqueue or publish
    for job_id, queue in rows:
        send(job_id, queue)
    return [r[0] for r in rows]


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
                ids = republish_queued(self.session_factory, self.queues, self.enqueue)
                if ids:
                    log.info("reaper: re-published %d queued job(s)", len(ids))
            except Exception:
                log.exception("reaper: re-publishing queued jobs failed")
        while not self.stop_event.is_set():
            try:
                reap_once(self.settings, self.session_factory, self.enqueue)
            except Exception:  # database briefly away: try again next round
                log.exception("reaper pass failed")
            self.stop_event.wait(self.interval)


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
