"""The Celery app, built from Settings (never at import time).

Broker choice:
- production: Redis (``FINEGATES_BROKER_URL=redis://...``), with a visibility timeout
  longer than the longest job so an unacknowledged job is never redelivered while it
  still runs (Celery's guide; the claim guard in the task makes a late duplicate harmless).
- embedded default: kombu's SQLAlchemy transport on its own SQLite file
  (``sqla+sqlite:///<data_dir>/broker.sqlite``). Why not the filesystem transport: it
  renames a message file and reads it without the writer's lock, so a poll can catch a
  half-written message; the SQLAlchemy transport takes and hides a message in one
  ``BEGIN IMMEDIATE`` transaction. Both lose a message whose worker is SIGKILLed (neither
  restores unacked messages), which is why the reaper (worker/reaper.py) requeues jobs
  with a stale heartbeat instead of relying on the broker for crash recovery.

Always real Celery with a separate worker process: no eager mode, no in-memory queue.
``celery -A worker.celery_app worker`` finds ``app`` through the module ``__getattr__``
below, so the environment (``finegates serve --data-dir``) is read when the worker
starts, not when Python imports this file.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

if TYPE_CHECKING:
    from api.settings import Settings

TASK_RUN_JOB = "finegates.run_job"
QUEUES = ("gpu", "cpu")
# How often a worker on the embedded SQL broker looks for a message (kombu's default is
# 1 s, i.e. half a second of queue wait on average before a job even starts). An idle
# poll is one small transaction per queue on the broker's SQLite file.
EMBEDDED_POLL_INTERVAL_S = 0.1

_lock = threading.Lock()
_apps: dict[str, Celery] = {}


def broker_url_for(settings: Settings) -> str:
    """The configured broker, else the server-less embedded one under data_dir."""
    if settings.broker_url:
        return settings.broker_url
    return f"sqla+sqlite:///{settings.data_path / 'broker.sqlite'}"


def is_embedded_broker(url: str) -> bool:
    return url.startswith(("sqla+", "sqlalchemy+", "filesystem:"))


def make_celery(settings: Settings) -> Celery:
    """A Celery app for the API (producer) and the worker (consumer), from one Settings."""
    url = broker_url_for(settings)
    embedded = is_embedded_broker(url)
    if url.startswith("sqla+sqlite:///"):
        settings.data_path.mkdir(parents=True, exist_ok=True)
    if url.startswith(("sqla+", "sqlalchemy+")):
        _set_sql_poll_interval(EMBEDDED_POLL_INTERVAL_S)
    app = Celery("finegates", broker=url, include=["worker.tasks"])
    transport_options: dict[str, Any] = {}
    if url.startswith(("redis://", "rediss://")):
        # Longer than any job: Redis redelivers an unacked message after this long.
        transport_options["visibility_timeout"] = int(settings.max_job_seconds) + 3600
    # The SQLAlchemy transport passes every transport option to create_engine(), so it
    # gets none (its poll interval is set on the class instead: _set_sql_poll_interval).
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_heartbeat=30,  # AMQP brokers; Redis and SQL ignore it
        # JSON only: a pickle payload would let whoever reaches the broker run code.
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        # State lives in the database; Celery results are not needed.
        task_ignore_result=True,
        result_backend=None,
        # Long jobs: ack after the task returns, one job at a time per worker process.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A broker hiccup must not kill an hours-long training run; duplicates are
        # rejected by the guarded claim.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_default_exchange="cpu",
        task_default_routing_key="cpu",
        task_create_missing_queues=False,
        # Solo pool: the job runs in the worker's main process, so a warm shutdown can
        # ask the training loop to checkpoint and stop (worker/tasks.py), and a SIGKILL
        # takes the whole job down at once (no orphaned pool child holding the GPU).
        # Scale out with more worker processes (one per GPU), not pool threads.
        worker_pool="solo",
        worker_concurrency=1,
        # Virtual transports (SQL, filesystem) have no cross-process fanout for remote
        # control; Redis does.
        worker_enable_remote_control=not embedded,
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    app.conf.finegates_embedded = embedded
    return app


def _set_sql_poll_interval(seconds: float) -> None:
    """kombu's SQLAlchemy transport cannot take ``polling_interval`` as a transport option
    (it hands every option to ``create_engine()``, which rejects it), so set the class
    default. Only FineGates' embedded broker uses this transport in our processes."""
    from kombu.transport import sqlalchemy as kombu_sqla

    kombu_sqla.Transport.polling_interval = seconds


def get_app(settings: Settings | None = None) -> Celery:
    """The process-wide app for these settings (default: ``api.settings.get_settings()``).

    Cached per broker URL: the API publishes with the app of its own settings object,
    which tests may build per test.
    """
    if settings is None:
        from api.settings import get_settings

        settings = get_settings()
    key = broker_url_for(settings)
    with _lock:
        app = _apps.get(key)
        if app is None:
            app = _apps[key] = make_celery(settings)
        return app


def reset_app() -> None:
    """Forget cached apps (tests, and ``finegates serve`` after changing settings)."""
    with _lock:
        _apps.clear()


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app` (or `celery`) on this module.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
