"""The worker's consuming Celery app, built from Settings (never at import time).

The task name, the queues, the serializer and the broker options come from
``api.queue`` (the API publishes with the same definitions); what is added here only
concerns a process that consumes: the solo pool, prefetch, remote control, logging.

Always real Celery with a separate worker process: no eager mode, no in-memory queue.
``celery -A worker.celery_app worker`` finds ``app`` through the module ``__getattr__``
below, so the environment (``finegates serve --data-dir``) is read when the worker
starts, not when Python imports this file.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from celery import Celery

from api.queue import broker_url_for, is_embedded_broker, new_celery, reset_producers

if TYPE_CHECKING:
    from api.settings import Settings

# How often a worker on the embedded SQL broker looks for a message (kombu's default is
# 1 s, i.e. half a second of queue wait on average before a job even starts). An idle
# poll is one small transaction per queue on the broker's SQLite file.
EMBEDDED_POLL_INTERVAL_S = 0.1

_lock = threading.Lock()
_apps: dict[str, Celery] = {}


def make_celery(settings: Settings) -> Celery:
    """The consuming app: ``api.queue``'s shared options plus the worker's own."""
    url = broker_url_for(settings)
    embedded = is_embedded_broker(url)
    if url.startswith(("sqla+", "sqlalchemy+")):
        _set_sql_poll_interval(EMBEDDED_POLL_INTERVAL_S)
    app = new_celery(settings, include=["worker.tasks"])
    app.conf.update(
        # One job at a time per worker process.
        worker_prefetch_multiplier=1,
        # A broker hiccup must not kill an hours-long training run; duplicates are
        # rejected by the guarded claim.
        worker_cancel_long_running_tasks_on_connection_loss=False,
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
    return app


def _set_sql_poll_interval(seconds: float) -> None:
    """kombu's SQLAlchemy transport cannot take ``polling_interval`` as a transport option
    (it hands every option to ``create_engine()``, which rejects it), so set the class
    default. Only FineGates' embedded broker uses this transport in our processes."""
    from kombu.transport import sqlalchemy as kombu_sqla

    kombu_sqla.Transport.polling_interval = seconds


def get_app(settings: Settings | None = None) -> Celery:
    """The process-wide app for these settings (default: ``api.settings.get_settings()``),
    cached per broker URL."""
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
    """Forget cached apps, consuming and publishing (tests that build a broker each)."""
    with _lock:
        _apps.clear()
    reset_producers()


def __getattr__(name: str) -> Any:
    # `celery -A worker.celery_app` looks up `app` (or `celery`) on this module.
    if name in ("app", "celery"):
        return get_app()
    raise AttributeError(name)
