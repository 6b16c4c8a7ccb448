"""Limits that keep one tenant from hurting the others (issue 12).

- ``RequestGuard``: an ASGI middleware that answers 413 for a JSON body over
  ``max_request_bytes`` before anything parses it (uploads keep their own cap), 431 for
  headers over ``max_header_bytes``, and adds the ``x-ratelimit-*`` headers of the
  caller's window to every response.
- ``RateLimiter``: requests per minute per tenant with the `limits` library (sliding
  window counter), stored in Redis in production (shared by every API process) and in
  process memory in the embedded mode.
- ``InferenceSlots``: concurrent inference requests per tenant (per API process).
- ``run_cpu``: CPU-bound request work (tokenizing, chat templates) in a bounded thread
  pool, never on the event loop.
- ``tenant_lock`` + ``check_*``: active jobs, stored bytes and file count are checked and
  inserted under a lock on the tenant's row (plus an in-process lock for SQLite, which
  ignores FOR UPDATE), so concurrent creates cannot pass a limit.
- ``TenantLimits``: the settings' defaults with the tenant's overrides
  (``finegates tenants update``), resolved once per authentication (so cached with it).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.db.models import File, Job, Tenant
from api.errors import APIError, error_body
from api.settings import Settings

T = TypeVar("T")

# Routes whose body is not parsed as JSON and has its own, larger cap.
UPLOAD_PATHS = ("/v1/files",)
RATE_HEADERS_KEY = "finegates.ratelimit_headers"

log = logging.getLogger("finegates.api")


@dataclass(frozen=True)
class TenantLimits:
    requests_per_minute: int
    max_active_jobs: int
    max_storage_bytes: int
    max_files: int
    max_concurrent_inference: int

    @classmethod
    def resolve(cls, settings: Settings, tenant: Tenant | None) -> TenantLimits:
        def pick(column: str, default: int) -> int:
            override = getattr(tenant, column, None) if tenant is not None else None
            return default if override is None else int(override)

        return cls(
            requests_per_minute=pick("requests_per_minute", settings.rate_limit_per_minute),
            max_active_jobs=pick("max_active_jobs", settings.max_active_jobs_per_tenant),
            max_storage_bytes=pick("max_storage_bytes", settings.max_storage_bytes_per_tenant),
            max_files=pick("max_files", settings.max_files_per_tenant),
            max_concurrent_inference=pick(
                "max_concurrent_inference", settings.max_concurrent_inference_per_tenant
            ),
        )


def limits_for(session: Session, settings: Settings, tenant_id: str) -> TenantLimits:
    tenant = session.execute(select(Tenant).where(Tenant.id == tenant_id)).scalar_one_or_none()
    return TenantLimits.resolve(settings, tenant)


# ---------------------------------------------------------------- body and header caps


def _json_error(status: int, message: str, code: str, param: str | None = None) -> bytes:
    import json

    return json.dumps(error_body(status, message, param=param, code=code)).encode()


class RequestGuard:
    """Pure ASGI (no BaseHTTPMiddleware): streaming responses pass through untouched."""

    def __init__(self, app: Any, settings: Settings):
        self.app = app
        self.max_body = settings.max_request_bytes
        self.max_headers = settings.max_header_bytes

    async def _reply(self, send: Any, status: int, body: bytes, extra: list | None = None) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send(
            {"type": "http.response.start", "status": status, "headers": headers + (extra or [])}
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope.get("headers", ()))
        if header_bytes > self.max_headers:
            await self._reply(
                send,
                431,
                _json_error(
                    431,
                    f"The request headers are {header_bytes} bytes; at most {self.max_headers} "
                    "(FINEGATES_MAX_HEADER_BYTES)",
                    "request_header_fields_too_large",
                ),
                [(b"connection", b"close")],
            )
            return

        async def send_with_rate_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                extra = (scope.get("state") or {}).get(RATE_HEADERS_KEY)
                if extra:
                    present = {k.lower() for k, _ in message.get("headers", [])}
                    message = dict(message)
                    message["headers"] = list(message.get("headers", [])) + [
                        (k.encode(), v.encode())
                        for k, v in extra.items()
                        if k.encode() not in present
                    ]
            await send(message)

        path: str = scope.get("path", "")
        if scope.get("method") in ("GET", "HEAD", "DELETE", "OPTIONS") or path in UPLOAD_PATHS:
            await self.app(scope, receive, send_with_rate_headers)
            return
        too_big = _json_error(
            413,
            f"The request body is larger than {self.max_body} bytes (FINEGATES_MAX_REQUEST_BYTES)",
            "request_too_large",
        )
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            await self._reply(send, 413, too_big, [(b"connection", b"close")])
            return
        # Read the body here, bounded, then hand it to the app: a body without (or lying
        # about) its length is cut at the cap instead of being parsed.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await self._reply(send, 413, too_big, [(b"connection", b"close")])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_rate_headers)


# ---------------------------------------------------------------- requests per minute


def _reset_text(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: 1s, 6m0s, 250ms."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    s = math.ceil(seconds)
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


class RateLimiter:
    def __init__(self, settings: Settings):
        from limits import RateLimitItemPerMinute  # noqa: F401 (import check)
        from limits.aio.strategies import SlidingWindowCounterRateLimiter
        from limits.storage import storage_from_string

        url = settings.rate_limit_storage_url
        if url is None:
            broker = settings.broker_url or ""
            url = broker if broker.startswith(("redis://", "rediss://")) else "memory://"
        options: dict[str, Any] = {}
        if url.startswith(("redis", "rediss")):
            options["implementation"] = "redispy"  # redis-py comes with celery[redis]
        if not url.startswith("async+"):
            url = "async+" + url
        self.url = url
        self.storage = storage_from_string(url, **options)
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)

    async def hit(self, tenant_id: str, per_minute: int) -> dict[str, str]:
        """Count one request; the headers to send, or APIError 429 when over the limit."""
        from limits import RateLimitItemPerMinute

        item = RateLimitItemPerMinute(per_minute)
        try:
            allowed = await self.strategy.hit(item, "tenant", tenant_id)
            stats = await self.strategy.get_window_stats(item, "tenant", tenant_id)
        except Exception as exc:  # noqa: BLE001 - any storage failure
            # Fail open: an unreachable rate-limit store (Redis restarting) must not turn
            # every request into a 500; the job paths have their own outage handling.
            log.warning("rate limit storage unavailable (%s); not counting", type(exc).__name__)
            return {}
        reset_in = max(0.0, stats.reset_time - time.time())
        headers = {
            "x-ratelimit-limit-requests": str(per_minute),
            "x-ratelimit-remaining-requests": str(max(0, stats.remaining)),
            "x-ratelimit-reset-requests": _reset_text(reset_in),
        }
        if not allowed:
            raise APIError(
                429,
                f"Rate limit reached: {per_minute} requests per minute for your organization; "
                f"retry in {_reset_text(reset_in)}",
                code="rate_limit_exceeded",
                headers={**headers, "Retry-After": str(max(1, math.ceil(reset_in)))},
            )
        return headers


async def enforce_rate_limit(request: Any, tenant_id: str, limits: TenantLimits) -> None:
    """Called by authentication for every authenticated request (api/deps.py)."""
    if limits.requests_per_minute <= 0:
        return
    limiter: RateLimiter | None = getattr(request.app.state, "rate_limiter", None)
    if limiter is None:
        return
    headers = await limiter.hit(tenant_id, limits.requests_per_minute)
    request.scope.setdefault("state", {})[RATE_HEADERS_KEY] = headers


# ---------------------------------------------------------------- concurrent inference


class InferenceSlots:
    """At most N inference requests of one tenant at a time in this process; more: 429."""

    def __init__(self) -> None:
        self._busy: dict[str, int] = {}
        self._lock = threading.Lock()

    def acquire(self, tenant_id: str, limit: int) -> None:
        with self._lock:
            n = self._busy.get(tenant_id, 0)
            if n >= limit:
                raise APIError(
                    429,
                    f"Too many concurrent inference requests ({n}; limit {limit}); wait for "
                    "one to finish",
                    code="too_many_concurrent_requests",
                    headers={"Retry-After": "1"},
                )
            self._busy[tenant_id] = n + 1

    def release(self, tenant_id: str) -> None:
        with self._lock:
            left = self._busy.get(tenant_id, 1) - 1
            if left <= 0:
                self._busy.pop(tenant_id, None)
            else:
                self._busy[tenant_id] = left

    @asynccontextmanager
    async def hold(self, tenant_id: str, limit: int) -> Any:
        self.acquire(tenant_id, limit)
        try:
            yield
        finally:
            self.release(tenant_id)

    def busy(self, tenant_id: str) -> int:
        with self._lock:
            return self._busy.get(tenant_id, 0)


# ---------------------------------------------------------------- CPU work off the loop

_cpu_limiters: dict[int, Any] = {}
_cpu_lock = threading.Lock()


def _cpu_limiter(n: int) -> Any:
    import anyio

    with _cpu_lock:
        lim = _cpu_limiters.get(n)
        if lim is None:
            lim = _cpu_limiters[n] = anyio.CapacityLimiter(n)
        return lim


async def run_cpu(settings: Any, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a thread; at most ``settings.cpu_threads`` at once per process."""
    import anyio.to_thread

    n = int(getattr(settings, "cpu_threads", 4) or 4)
    return await anyio.to_thread.run_sync(fn, *args, limiter=_cpu_limiter(n))


# ---------------------------------------------------------------- atomic quotas

_tenant_locks: dict[str, threading.Lock] = {}
_tenant_locks_guard = threading.Lock()


@contextmanager
def tenant_lock(session: Session, tenant_id: str) -> Iterator[None]:
    """Serialise count-then-insert for one tenant until the caller commits.

    PostgreSQL: ``SELECT ... FOR UPDATE`` on the tenant's row, held to the end of the
    transaction (every API process). SQLite ignores FOR UPDATE, so an in-process lock
    does it there (the embedded mode runs one API process). Commit INSIDE the block.
    """
    with _tenant_locks_guard:
        lock = _tenant_locks.setdefault(tenant_id, threading.Lock())
    with lock:
        session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
        yield


def check_active_jobs(session: Session, tenant_id: str, limit: int) -> None:
    from api import jobstate

    active = session.execute(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant_id, Job.status.in_(list(jobstate.ACTIVE)))
    ).scalar_one()
    if active >= limit:
        raise APIError(
            429,
            f"You have {active} unfinished jobs (limit {limit}); wait for some to finish or "
            "cancel them",
            code="too_many_active_jobs",
        )


def check_storage(session: Session, tenant_id: str, limits: TenantLimits, new_bytes: int) -> None:
    count, used = session.execute(
        select(func.count(), func.coalesce(func.sum(File.bytes), 0)).where(
            File.tenant_id == tenant_id
        )
    ).one()
    if count + 1 > limits.max_files:
        raise APIError(
            429,
            f"You have {count} files (limit {limits.max_files}); delete some first",
            param="file",
            code="file_quota_exceeded",
        )
    if int(used) + new_bytes > limits.max_storage_bytes:
        raise APIError(
            429,
            f"This file ({new_bytes} bytes) would take your stored files to "
            f"{int(used) + new_bytes} bytes (limit {limits.max_storage_bytes}); delete some "
            "files first",
            param="file",
            code="storage_quota_exceeded",
        )


# ---------------------------------------------------------------- hyperparameter caps


def check_job_size(hp: dict[str, Any], task: str, settings: Settings) -> None:
    """Keep one job inside a worker's memory (docs/service.md, "Limits").

    Training memory past the weights grows with the tokens of one batch; the largest
    term is the logits and their gradient, tokens x vocab x 8 bytes (SmolLM2's vocab is
    49,152: 16,384 tokens -> 6.4 GB). So batch_size x max_length is capped
    (FINEGATES_MAX_TOKENS_PER_BATCH), and batch_size alone (FINEGATES_MAX_BATCH_SIZE).
    "auto" values count as the engine's defaults (8 x 512 for LMs, 32 x 128 otherwise).
    """
    lm = task != "classification"
    bs = hp.get("batch_size")
    ml = hp.get("max_length")
    batch = int(bs) if isinstance(bs, int) else (8 if lm else 32)
    length = int(ml) if isinstance(ml, int) else (512 if lm else 128)
    if batch > settings.max_batch_size:
        raise APIError(
            400,
            f"batch_size is {batch}; this server allows at most {settings.max_batch_size} "
            "(use gradient accumulation for larger effective batches)",
            param="hyperparameters.batch_size",
            code="batch_size_too_large",
        )
    if batch * length > settings.max_tokens_per_batch:
        raise APIError(
            400,
            f"batch_size x max_length is {batch} x {length} = {batch * length} tokens per "
            f"batch; this server allows at most {settings.max_tokens_per_batch}",
            param="hyperparameters.batch_size",
            code="batch_too_large",
        )


def inference_slot(request: Any, principal: Any) -> tuple[InferenceSlots | None, str]:
    """Take one of the caller's inference slots (429 when all are busy); release it with
    ``slots.release(tenant)``. None when the app has no slots (tools, old tests)."""
    slots: InferenceSlots | None = getattr(request.app.state, "inference_slots", None)
    if slots is None:
        return None, principal.tenant_id
    limits = principal.limits
    settings = getattr(request.app.state, "settings", None)
    if limits is not None:
        limit = limits.max_concurrent_inference
    else:
        limit = getattr(settings, "max_concurrent_inference_per_tenant", 16)
    slots.acquire(principal.tenant_id, limit)
    return slots, principal.tenant_id


# ---------------------------------------------------------------- the spec declares errors

# What every operation can answer besides its success: bad input, auth, ownership,
# conflicts, size caps, rate limits, oversized headers, internal faults.
ERROR_STATUSES = {
    "400": "Invalid request (param names the field)",
    "401": "Missing or invalid API key",
    "403": "Not allowed",
    "404": "Not found (or another tenant's)",
    "405": "Method not allowed",
    "409": "Conflict with the object's state",
    "413": "Request body or file too large",
    "415": "Unsupported media type",
    "429": "Rate limit or quota reached (Retry-After)",
    "431": "Request headers too large",
    "500": "Internal error (with a reference id)",
    "503": "Service unavailable",
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": "string"},
                "line": {"type": ["integer", "null"]},
                "field": {"type": ["string", "null"]},
            },
        }
    },
}


def declare_error_responses(app: Any) -> None:
    """Add the OpenAI error body and every error status to each operation of ``app``'s
    OpenAPI document (routes never return FastAPI's 422: validation errors are 400)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = original()
        schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = (
            _ERROR_SCHEMA
        )
        ref = {"$ref": "#/components/schemas/ErrorResponse"}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                if not isinstance(op, dict) or "responses" not in op:
                    continue
                responses = op["responses"]
                responses.pop("422", None)
                for status, description in ERROR_STATUSES.items():
                    responses.setdefault(
                        status,
                        {
                            "description": description,
                            "content": {"application/json": {"schema": ref}},
                        },
                    )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


# ---------------------------------------------------------------- fair share of workers


def fair_share_pick(session: Session, job: Job) -> str | None:
    """The queued job that should run instead of ``job`` (None: ``job`` itself).

    The broker is first-in first-out, so one tenant's 100 queued jobs would run before
    another tenant's first. Whichever message a worker receives, it runs the oldest queued
    job (same queue) of the tenant with the fewest running jobs, least recently served
    first (its latest start), and the message's own job is re-published. Within one
    tenant, the oldest queued job goes first (a re-published message cannot reorder
    them). So a tenant's first job waits behind at most the job a worker
    is already running.
    """
    from sqlalchemy.orm import aliased

    from api import jobstate

    other = aliased(Job)
    running = (
        select(func.count())
        .select_from(other)
        .where(other.tenant_id == Job.tenant_id, other.status == jobstate.RUNNING)
        .correlate(Job)
        .scalar_subquery()
    )
    last_start = (
        select(func.max(other.started_at))
        .where(other.tenant_id == Job.tenant_id)
        .correlate(Job)
        .scalar_subquery()
    )
    row = session.execute(
        select(Job.id, Job.tenant_id)
        .where(
            Job.queue == job.queue,
            Job.status == jobstate.QUEUED,
            Job.cancel_requested.is_not(True),
        )
        .order_by(running.asc(), last_start.asc().nulls_first(), Job.pk.asc())
        .limit(1)
    ).first()
    if row is None or row.id == job.id:
        return None
    return str(row.id)
