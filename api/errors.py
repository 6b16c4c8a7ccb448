"""Every error the API returns has OpenAI's shape: {"error": {message, type, param, code}}.

Why one place and one exception type (``APIError``, raised by the routes, the
dependencies and the inference engine alike): the openai SDK turns this body into typed
exceptions (BadRequestError, NotFoundError, ...) with ``.param`` and ``.code``; a stray
FastAPI ``{"detail": ...}`` would lose the param a user needs to fix their request. Data
errors also carry ``line``.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy import exc as sa_exc
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.redact import internal_error_message, reference_id, scrub
from core.errors import ConfigError, DataError, FineGatesError, ModelNotFoundError

log = logging.getLogger("finegates.api")

_DEFAULT_CODES = {
    400: "invalid_request",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "file_too_large",
    415: "unsupported_media_type",
    429: "rate_limit_exceeded",
    431: "request_header_fields_too_large",
    500: "server_error",
    503: "service_unavailable",
}


def error_type(status: int) -> str:
    if status >= 500:
        return "server_error"
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error"


def error_body(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    err: dict[str, Any] = {
        "message": message,
        "type": error_type(status),
        "param": param,
        # every error has a code (OpenAI SDK users branch on it)
        "code": code
        or _DEFAULT_CODES.get(status)
        or ("server_error" if status >= 500 else "invalid_request"),
    }
    err.update({k: v for k, v in extra.items() if v is not None})
    return {"error": err}


class APIError(Exception):
    """Raise from handlers, dependencies and the inference engine; rendered by the handler
    below (or, once a stream has started, sent in-band as ``body()``)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code, **self.extra)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def not_found(kind: str, obj_id: str, param: str | None = None) -> APIError:
    # Same answer for "never existed" and "belongs to another tenant": no id probing.
    return APIError(404, f"No {kind} with id '{obj_id}'", param=param, code=f"{kind}_not_found")


def from_engine_error(exc: FineGatesError, param_prefix: str = "") -> APIError:
    """Map a core error to a 4xx (user errors) or 500 (internal faults).

    Engine messages may name server paths (written for the command line): tenants get
    them scrubbed (api.redact); an internal fault gets a reference id, its text goes to
    the log only."""
    message = scrub(exc.message)
    if isinstance(exc, ConfigError):
        return APIError(400, message, param=exc.field, code=exc.code)
    if isinstance(exc, DataError):
        return APIError(400, message, param=exc.field, code=exc.code, line=exc.line)
    if isinstance(exc, ModelNotFoundError):
        return APIError(404, message, param=param_prefix or "model", code=exc.code)
    if exc.user_error:
        return APIError(400, message, param=param_prefix or None, code=exc.code)
    ref = reference_id()
    log.error("internal engine error %s: %s", ref, exc.message)
    return APIError(500, internal_error_message(ref), code=exc.code)


_SOURCES = ("body", "query", "path", "header", "cookie", "form")
# The names pydantic gives union members in an error location: input.str, input.list[str]
_UNION_MEMBERS = frozenset({"str", "int", "float", "bool", "bytes", "none", "null"})


def _loc_to_param(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'role') -> 'messages[0].role'; union member names dropped."""
    parts = list(loc[1:] if loc and loc[0] in _SOURCES else loc)
    param = ""
    for part in parts:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _UNION_MEMBERS or "[" in str(part) or str(part).startswith("function-"):
            continue
        else:
            param += f".{part}" if param else str(part)
    return param or None


DB_RETRY_AFTER_S = 2


def database_unavailable(exc: BaseException) -> bool:
    """A connection-level database failure (retryable), not a bad statement."""
    return isinstance(
        exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
    ) or bool(getattr(exc, "connection_invalidated", False))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_req: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_req: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        # The deepest location first: when a union field fails (content: str | list[...]),
        # pydantic reports every member, and the deepest is the one the client meant.
        first = (
            max(errors, key=lambda e: len(e.get("loc", ())))
            if errors
            else {"loc": (), "msg": "invalid request"}
        )
        param = _loc_to_param(tuple(first.get("loc", ())))
        msg = str(first.get("msg", "invalid request"))
        if first.get("type") == "json_invalid":
            message, param = f"The request body is not valid JSON: {msg}", None
        else:
            message = f"{param}: {msg}" if param else msg
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return JSONResponse(
            error_body(400, message, param=param, code="invalid_request"), status_code=400
        )

    @app.exception_handler(FineGatesError)
    async def _engine_error(_req: Request, exc: FineGatesError) -> JSONResponse:
        return from_engine_error(exc).response()

    @app.exception_handler(SQLAlchemyError)
    async def _database_error(_req: Request, exc: SQLAlchemyError) -> JSONResponse:
        if not database_unavailable(exc):
            log.exception("database error", exc_info=exc)
            return JSONResponse(
                error_body(500, "The server had an error while processing your request."),
                status_code=500,
            )
        # The database is away (restarting, failing over) or the pool is exhausted: a
        # retryable 503; the pool's pre-ping reconnects once it is back.
        log.warning("database unavailable: %s", type(exc).__name__)
        return JSONResponse(
            error_body(
                503,
                "The service is temporarily unavailable (its database cannot be reached); "
                "retry shortly.",
                code="database_unavailable",
            ),
            status_code=503,
            headers={"Retry-After": str(DB_RETRY_AFTER_S)},
        )

    @app.exception_handler(Exception)
    async def _unhandled(_req: Request, exc: Exception) -> JSONResponse:
        ref = reference_id()
        log.error("unhandled error %s", ref, exc_info=exc)
        return JSONResponse(
            error_body(500, internal_error_message(ref), code="server_error"),
            status_code=500,
        )
