"""The webhook dispatcher: finds ended jobs, sends their signed events, retries with backoff.

Why a poller over finished jobs and not a hook in every state change: a job ends in the
worker (succeeded, failed), in the API (cancelled while queued) or in the reaper (failed
after its attempts), and a hook in each would be one more thing each must not forget. The
dispatcher instead creates one ``webhook_deliveries`` row per (webhook, job, event type),
the unique constraint making that exactly-once across workers, and every attempt is
appended to the row. ``dispatch_once`` is the plain function (tests call it); the worker
runs it in a thread every few seconds (``start_dispatcher``, from worker_ready).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from api.db.models import Job, Webhook, WebhookDelivery, new_id, utcnow
from api.db.session import session_scope
from api.webhooks import BACKOFF_S, STATUS_EVENT, WebhookURLError, check_url, event_payload
from api.webhooks import signed_request as _signed

if TYPE_CHECKING:
    from api.settings import Settings

log = logging.getLogger(__name__)

# A job that ended longer ago than this before a webhook existed never gets an event.
LOOKBACK = timedelta(days=7)
Sender = Callable[[str, str, dict[str, str], float], int]


def _http_send(url: str, body: str, headers: dict[str, str], timeout: float) -> int:
    import httpx

    r = httpx.post(url, content=body, headers=headers, timeout=timeout, follow_redirects=False)
    return r.status_code


def _create_deliveries(s: Session) -> int:
    """One pending delivery per (webhook, ended job, event type) not yet recorded."""
    now = utcnow()
    rows = s.execute(
        select(Webhook, Job)
        .join(Job, Job.tenant_id == Webhook.tenant_id)
        .outerjoin(
            WebhookDelivery,
            and_(WebhookDelivery.webhook_id == Webhook.id, WebhookDelivery.job_id == Job.id),
        )
        .where(
            Job.status.in_(list(STATUS_EVENT)),
            Job.finished_at.is_not(None),
            Job.finished_at >= Webhook.created_at,
            Job.finished_at >= now - LOOKBACK,
            WebhookDelivery.pk.is_(None),
        )
        .limit(500)
    ).all()
    made = 0
    for hook, job in rows:
        event_type = STATUS_EVENT[job.status]
        subscribed = event_type in (hook.events or [])
        msg_id = new_id("evt_")
        try:
            with s.begin_nested():
                s.add(
                    WebhookDelivery(
                        id=msg_id,
                        webhook_id=hook.id,
                        job_id=job.id,
                        type=event_type,
                        payload=event_payload(msg_id, event_type, job),
                        # "skipped": an event type the hook did not ask for (recorded so
                        # the scan does not find the job again; never listed)
                        status="pending" if subscribed else "skipped",
                        attempts=[],
                        next_attempt_at=now if subscribed else None,
                    )
                )
            made += subscribed
        except IntegrityError:  # another worker recorded it first
            pass
    s.commit()
    return made


def _attempt(
    s: Session, d: WebhookDelivery, hook: Webhook, settings: Settings, send: Sender
) -> None:
    now = utcnow()
    t0 = time.monotonic()
    record: dict[str, Any] = {"at": int(now.timestamp())}
    ok = False
    try:
        check_url(hook.url, settings.webhook_allow_private)  # DNS may have changed
        body, headers = _signed(hook.secret, d.id, d.payload, now)
        code = send(hook.url, body, headers, settings.webhook_timeout_s)
        record["status_code"] = code
        ok = 200 <= code < 300
        if not ok:
            record["error"] = f"the endpoint answered HTTP {code}"
    except WebhookURLError as exc:
        record["error"] = str(exc)
    except Exception as exc:  # network errors: the tenant sees the kind, not our insides
        record["error"] = f"could not deliver ({type(exc).__name__})"
    record["duration_ms"] = int((time.monotonic() - t0) * 1000)
    attempts = [*(d.attempts or []), record]
    d.attempts = attempts
    if ok:
        d.status, d.next_attempt_at = "delivered", None
    elif len(attempts) >= settings.webhook_max_attempts:
        d.status, d.next_attempt_at = "failed", None
    else:
        wait = BACKOFF_S[min(len(attempts), len(BACKOFF_S)) - 1]
        d.next_attempt_at = now + timedelta(seconds=wait)
    s.commit()


def dispatch_once(
    settings: Settings, factory: sessionmaker[Session], send: Sender | None = None
) -> int:
    """Record new events and make every attempt that is due; returns attempts made."""
    send = send or _http_send
    with session_scope(factory) as s:
        _create_deliveries(s)
    made = 0
    with session_scope(factory) as s:
        due = s.execute(
            select(WebhookDelivery, Webhook)
            .join(Webhook, Webhook.id == WebhookDelivery.webhook_id)
            .where(WebhookDelivery.status == "pending", WebhookDelivery.next_attempt_at <= utcnow())
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(50)
        ).all()
        for d, hook in due:
            # claim the attempt: push next_attempt_at so a second worker skips it
            claimed = s.execute(  # type: ignore[attr-defined]
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.pk == d.pk,
                    WebhookDelivery.status == "pending",
                    WebhookDelivery.next_attempt_at == d.next_attempt_at,
                )
                .values(
                    next_attempt_at=utcnow() + timedelta(seconds=settings.webhook_timeout_s * 3)
                )
            ).rowcount
            s.commit()
            if claimed != 1:
                continue
            s.refresh(d)
            _attempt(s, d, hook, settings, send)
            made += 1
    return made


_thread: threading.Thread | None = None
_stop = threading.Event()


def start_dispatcher(
    settings: Settings, factory: sessionmaker[Session], interval_s: float = 5.0
) -> None:
    """Run dispatch_once every ``interval_s`` (and the retention sweep hourly) in a daemon
    thread (one per process)."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return
    _stop.clear()

    def loop() -> None:
        from worker.retention import sweep

        next_sweep = 0.0
        while not _stop.wait(interval_s):
            try:
                dispatch_once(settings, factory)
            except Exception:
                log.exception("webhook dispatch failed; retrying in %.0f s", interval_s)
            if time.monotonic() >= next_sweep:  # retention, hourly (worker/retention.py)
                next_sweep = time.monotonic() + 3600
                try:
                    sweep(settings, factory)
                except Exception:
                    log.exception("retention sweep failed")

    _thread = threading.Thread(target=loop, name="finegates-webhooks", daemon=True)
    _thread.start()


def stop_dispatcher() -> None:
    _stop.set()
