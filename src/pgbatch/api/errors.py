"""One JSON shape for every API error, and the mapping of pgbatch's exceptions onto it."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from pgbatch.api.schemas import ErrorOut
from pgbatch.errors import (
    BatchNotFoundError,
    BatchPrunedError,
    IdempotencyConflictError,
    InvalidBatchError,
    InvalidStateError,
    ShardTooLargeError,
    StaleVersionError,
)

__all__ = ["CLIENT_CLOSED", "ERRORS", "ApiError", "error_body", "install_error_handlers"]

_log = logging.getLogger(__name__)

# nginx's "client closed request": the answer nobody reads to a client that left.
CLIENT_CLOSED = 499
# A client told the database is busy or away retries after this many seconds: long
# enough not to hammer a recovering server, short against a restart (about a second).
DATABASE_RETRY_AFTER_S = 1

# FastAPI answers 400 with this detail when a JSON body cannot be decoded at all.
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"


class ApiError(Exception):
    """An error the API answers with `status` and `{"error": {code, message, field}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers
        # More members of "error" for the client's program (e.g. the missing references).
        self.details = details


def _errors(
    *codes: int, extra: dict[int | str, dict[str, Any]] | None = None
) -> dict[int | str, dict[str, Any]]:
    """Return the OpenAPI `responses` of a route: its error codes, plus `extra`."""
    described = {
        401: "Missing or invalid API token.",
        404: "No such batch (for this tenant).",
        410: "The batch finished and was pruned after its retention period (`pruned_at`).",
        409: "Conflict with the batch's state or an earlier submission.",
        412: "If-Match names an old version.",
        413: "The request is larger than the server accepts.",
        415: "Unsupported Content-Type.",
        422: "The request is malformed; `field` names the part.",
        428: "If-Match is required.",
    }
    if 404 in codes:  # any route that names a batch may find it pruned
        codes = (*codes, 410)
    out: dict[int | str, dict[str, Any]] = dict(extra or {})
    out.update({c: {"model": ErrorOut, "description": described[c]} for c in (401, 422, *codes)})
    return out


# Routes write `responses=ERRORS(404, 409)`: short enough to sit on the decorator line.
ERRORS = _errors


def error_body(
    code: str, message: str, field: str | None = None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Return the JSON body of an error."""
    return {"error": {**(details or {}), "code": code, "message": message, "field": field}}


def _respond(
    status: int,
    code: str,
    message: str,
    field: str | None = None,
    details: dict[str, Any] | None = None,
    **kw: Any,
) -> JSONResponse:
    return JSONResponse(error_body(code, message, field, details), status_code=status, **kw)


def _field_of(loc: tuple[Any, ...] | list[Any]) -> str | None:
    # ("body", "items", 3) -> "items.3"; ("query", "limit") -> "limit"; ("body",) -> "body"
    if tuple(loc) == ("body",):
        return "body"
    parts = (
        [str(p) for p in loc[1:]]
        if loc and loc[0] in {"body", "query", "path", "header"}
        else [str(p) for p in loc]
    )
    return ".".join(parts) or None


def install_error_handlers(api: FastAPI) -> None:
    """Make every error, the framework's own included, answer in the one JSON shape."""

    @api.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _respond(
            exc.status, exc.code, exc.message, exc.field, exc.details, headers=exc.headers
        )

    @api.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            # FastAPI locates a JSON syntax error at ("body", <offset>): the field is the body.
            ctx = first.get("ctx")
            error = ctx.get("error", "") if isinstance(ctx, dict) else ""
            return _respond(422, "invalid_request", f"body: not valid JSON ({error})", "body")
        field = _field_of(tuple(first.get("loc", ())))
        message = str(first.get("msg", "invalid request"))
        if field:
            message = f"{field}: {message}"
        return _respond(422, "invalid_request", message, field)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            # A body FastAPI cannot even decode (not UTF-8) is malformed input like any other.
            return _respond(422, "invalid_request", "body: not valid JSON (not UTF-8)", "body")
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _respond(exc.status_code, code, str(exc.detail), headers=exc.headers)

    @api.exception_handler(InvalidBatchError)
    async def invalid_batch(_: Request, exc: InvalidBatchError) -> JSONResponse:
        return _respond(422, "invalid_batch", str(exc), exc.field)

    @api.exception_handler(ShardTooLargeError)
    async def shard_too_large(_: Request, exc: ShardTooLargeError) -> JSONResponse:
        # 413, as for the other size limits; the message names the limit, as theirs do.
        return _respond(413, "shard_too_large", str(exc), exc.field)

    @api.exception_handler(BatchNotFoundError)
    async def not_found(_: Request, exc: BatchNotFoundError) -> JSONResponse:
        return _respond(404, "batch_not_found", str(exc))

    @api.exception_handler(BatchPrunedError)
    async def pruned(_: Request, exc: BatchPrunedError) -> JSONResponse:
        # 410, not 404: the batch existed and its retention period removed it.
        return _respond(
            410, "batch_pruned", str(exc), details={"pruned_at": exc.pruned_at.isoformat()}
        )

    @api.exception_handler(IdempotencyConflictError)
    async def idempotency_conflict(_: Request, exc: IdempotencyConflictError) -> JSONResponse:
        return _respond(409, "idempotency_conflict", str(exc), "Idempotency-Key")

    @api.exception_handler(StaleVersionError)
    async def stale(_: Request, exc: StaleVersionError) -> JSONResponse:
        return _respond(
            412,
            "stale_version",
            f"{exc}; read the batch again and retry with its ETag",
            "If-Match",
            headers={"ETag": f'"{exc.current_version}"'},
        )

    @api.exception_handler(InvalidStateError)
    async def invalid_state(_: Request, exc: InvalidStateError) -> JSONResponse:
        return _respond(409, "invalid_state", str(exc))

    @api.exception_handler(ClientDisconnect)
    async def client_left(request: Request, _: ClientDisconnect) -> JSONResponse:
        # Not our error and not worth a traceback: the client closed mid-body.
        _log.info("client left during %s %s", request.method, request.url.path)
        return _respond(CLIENT_CLOSED, "client_closed", "the client closed the connection")

    retry_later = {"Retry-After": str(DATABASE_RETRY_AFTER_S)}

    # The pool had no connection in time, or the server cancelled a statement that waited
    # too long on a lock: the database is there, but busy. (Starlette picks the handler
    # of the most specific class, so these win over OperationalError's below.)
    async def database_busy(_: Request, exc: Exception) -> JSONResponse:
        _log.warning("database busy: %s", exc)
        return _respond(
            503,
            "database_busy",
            "the database is busy; retry after a moment",
            headers=retry_later,
        )

    for busy in (PoolTimeout, pg_errors.QueryCanceled, pg_errors.LockNotAvailable):
        api.add_exception_handler(busy, database_busy)

    async def database_unavailable(_: Request, exc: Exception) -> JSONResponse:
        # A lost connection or a database that is restarting: transient, the client's
        # retry is safe (a write answers success only after its commit).
        _log.warning("database unavailable: %s", exc)
        return _respond(
            503,
            "database_unavailable",
            "the database is unavailable; retry after a moment",
            headers=retry_later,
        )

    for unavailable in (pg_errors.OperationalError, pg_errors.InterfaceError):
        api.add_exception_handler(unavailable, database_unavailable)

    @api.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Our fault, not the client's: log it whole, say little.
        _log.exception("unhandled error in an API request")
        return _respond(500, "internal_error", "internal error; the server log has details")
