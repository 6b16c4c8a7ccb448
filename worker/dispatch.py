"""Putting a job on the broker. The API calls ``enqueue_job`` AFTER its commit.

Why after the commit: a worker may take the message within milliseconds; if the row were
not committed yet, the task would re-read nothing (or a stale status) and drop the job.
Only the job id travels (Celery's guide: pass ids, not objects); the task re-reads the row.
Duplicated messages are harmless: the task's guarded claim lets exactly one run.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Protocol

from worker.celery_app import QUEUES, TASK_RUN_JOB, get_app

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger(__name__)

_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}


class _JobLike(Protocol):
    id: str
    queue: str


def queue_for(job: Any, default: str = "cpu") -> str:
    """The queue a job runs on: its own ``queue`` column when valid, else the default."""
    q = getattr(job, "queue", None) or default
    return q if q in QUEUES else default


def enqueue_job(
    job: _JobLike | str, queue: str | None = None, settings: Settings | None = None
) -> None:
    """Publish ``run_job(job.id)`` on the job's queue ("gpu" or "cpu").

    Raises the broker's error when it stays unreachable after a few retries; the job row
    is then still ``queued`` and a worker re-publishes queued jobs when it starts
    (worker/reaper.py), so nothing is lost.
    """
    job_id = job if isinstance(job, str) else job.id
    q = queue or (queue_for(job) if not isinstance(job, str) else "cpu")
    get_app(settings).send_task(
        TASK_RUN_JOB,
        args=[job_id],
        queue=q,
        routing_key=q,
        retry=True,
        retry_policy=_RETRY_POLICY,
    )
    log.info("enqueued job %s on queue %s", job_id, q)
