"""The job queue's contract: one task name, two queues, one broker URL, and ``publish``.

Why it lives in api/: the API publishes jobs, and dependencies run ``core <- api <-
worker``, so the API cannot reach into the worker for this. The worker builds its
consuming Celery app from the same definitions (``new_celery``), so producer and consumer
cannot drift apart on the task name, the queues, the serializer or the broker options.

Broker choice:
- production: Redis (``FINEGATES_BROKER_URL=redis://...``), with a visibility timeout
  longer than the longest job so an unacknowledged job is never redelivered while it
  still runs (Celery's guide; the worker's guarded claim makes a late duplicate harmless).
- embedded default: kombu's SQLAlchemy transport on its own SQLite file
  (``sqla+sqlite:///<data_dir>/broker.sqlite``). Why not the filesystem transport: it
  renames a message file and reads it without the writer's lock, so a poll can catch a
  half-written message; the SQLAlchemy transport takes and hides a message in one
  ``BEGIN IMMEDIATE`` transaction. Both lose a message whose worker is SIGKILLed (neither
  restores unacked messages), which is why the worker's reaper requeues jobs with a stale
  heartbeat instead of relying on the broker for crash recovery.

Why ``publish`` is called only AFTER the job row is committed: a worker may take the
message within milliseconds; if the row were not committed yet, the task would re-read
nothing (or a stale status) and drop the job. Only the job id travels (Celery's guide:
pass ids, not objects); the task re-reads the row. Duplicated messages are harmless: the
guarded claim (api/jobstate.py) lets exactly one delivery run.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger("finegates.queue")

TASK_RUN_JOB = "finegates.run_job"
QUEUES = ("gpu", "cpu")
DEFAULT_QUEUE = "cpu"

# ``publish(job_id, queue)``: what the API (and the worker's reaper) call to put a job on
# the broker. Tests pass a recorder of this shape instead.
Publish = Callable[[str, str], None]

_RETRY_POLICY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2}

_lock = threading.Lock()
_producers: dict[str, Celery] = {}


def broker_url_for(settings: Settings) -> str:
    """The configured broker, else the server-less embedded one under data_dir."""
    if settings.broker_url:
        return settings.broker_url
    return f"sqla+sqlite:///{settings.data_path / 'broker.sqlite'}"


def is_embedded_broker(url: str) -> bool:
    return url.startswith(("sqla+", "sqlalchemy+", "filesystem:"))


def celery_options(settings: Settings) -> dict[str, Any]:
    """The Celery settings the publishing side and the consuming side must agree on."""
    url = broker_url_for(settings)
    transport_options: dict[str, Any] = {}
    if url.startswith(("redis://", "rediss://")):
        # Longer than any job: Redis redelivers an unacked message after this long.
        transport_options["visibility_timeout"] = int(settings.max_job_seconds) + 3600
    # The SQLAlchemy transport passes every transport option to create_engine(), so it
    # gets none (the worker sets its poll interval on the transport class instead).
    return {
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_heartbeat": 30,  # AMQP brokers; Redis and SQL ignore it
        # JSON only: a pickle payload would let whoever reaches the broker run code.
        "task_serializer": "json",
        "result_serializer": "json",
        "event_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # State lives in the database; Celery results are not needed.
        "task_ignore_result": True,
        "result_backend": None,
        # Long jobs: ack after the task returns; a worker lost mid-job leaves it unacked.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_queues": [Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        "task_default_queue": DEFAULT_QUEUE,
        "task_default_exchange": DEFAULT_QUEUE,
        "task_default_routing_key": DEFAULT_QUEUE,
        "task_create_missing_queues": False,
    }


def new_celery(settings: Settings, **kwargs: Any) -> Celery:
    """A Celery app on the configured broker with ``celery_options`` applied.

    ``kwargs`` go to ``Celery()``: the worker adds ``include=["worker.tasks"]``.
    """
    url = broker_url_for(settings)
    if url.startswith("sqla+sqlite:///"):
        settings.data_path.mkdir(parents=True, exist_ok=True)
    app = Celery("finegates", broker=url, **kwargs)
    app.conf.update(celery_options(settings))
    return app


def _producer(settings: Settings) -> Celery:
    # Cached per broker URL (an app holds a connection pool). Not the process's "current"
    # app: inside a worker process that must stay the worker's own consuming app.
    key = broker_url_for(settings)
    with _lock:
        app = _producers.get(key)
        if app is None:
            app = _producers[key] = new_celery(settings, set_as_current=False)
        return app


def publish(job_id: str, queue: str | None = None, *, settings: Settings | None = None) -> None:
    """Put ``run_job(job_id)`` on ``queue`` ("gpu" or "cpu"; None: the default queue).

    Raises the broker's error when it stays unreachable after a few retries; the job row
    is then still ``queued`` and a worker re-publishes queued jobs when it starts, so
    nothing is lost.
    """
    q = queue or DEFAULT_QUEUE
    if q not in QUEUES:
        raise ValueError(f"unknown queue {q!r}; expected one of {', '.join(QUEUES)}")
    if settings is None:
        from api.settings import get_settings

        settings = get_settings()
    _producer(settings).send_task(
        TASK_RUN_JOB,
        args=[job_id],
        queue=q,
        routing_key=q,
        retry=True,
        retry_policy=_RETRY_POLICY,
    )
    log.info("enqueued job %s on queue %s", job_id, q)


def reset_producers() -> None:
    """Forget cached producer apps (tests that build a broker per test module)."""
    with _lock:
        _producers.clear()
