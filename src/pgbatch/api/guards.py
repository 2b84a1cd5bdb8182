"""What every request passes before a route sees it: host and origin checks, body limits
and read timeouts, the pool wait of an API request, and a last answer for unexpected errors.

One ASGI middleware, in steps named for their concern (`_misdirected`, `_forbidden_origin`,
`_buffered_body`, `_streamed_body`). It runs before routing and parsing, so a route never
parses a body larger than the limit or waits on a client that stopped sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgbatch.api.errors import CLIENT_CLOSED, ApiError, error_body
from pgbatch.config import Settings

__all__ = [
    "CLIENT_CLOSED",
    "NDJSON",
    "NDJSON_MEDIA_TYPES",
    "NDJSON_UPLOAD_PATHS",
    "OCTET_STREAM",
    "RequestGuard",
    "UploadSlots",
    "is_loopback_host",
]

_log = logging.getLogger(__name__)

NDJSON = "application/x-ndjson"
# An NDJSON upload may also say application/octet-stream: client generators that know no
# x-ndjson (openapi-python-client) send a binary body that way.
OCTET_STREAM = "application/octet-stream"
NDJSON_MEDIA_TYPES = frozenset({NDJSON, OCTET_STREAM})
# A client told to retry (a busy pool, too many uploads) waits this long, in seconds.
RETRY_AFTER_S = 1
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback_host(host: str) -> bool:
    """Tell whether a Host header (or an Origin's host) names this machine's loopback."""
    name = host.strip().lower()
    if name.startswith("["):
        name, _, _ = name[1:].partition("]")
    elif name.count(":") == 1:
        name, _, port = name.partition(":")
        if not port.isascii() or not port.isdigit():
            return False
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _origin_is_loopback(origin: str) -> bool:
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a sandboxed page, a file:// page) and anything odd
    return is_loopback_host(parts.netloc)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


# A router that answers errors in a shape of its own (the OpenAI API under /openai/v1)
# registers its path prefix here, so the guard's refusals of its requests (a body too
# large or too slow) come in that shape too: prefix -> (status, code, message, field,
# headers) -> response.
ErrorShape = Callable[[int, str, str, str | None, dict[str, str] | None], JSONResponse]
ERROR_SHAPES: dict[str, ErrorShape] = {}
# Routes (a workload's) that spool a multipart upload as it streams, so the guard lets it
# through under PGBATCH_API_MAX_UPLOAD_BYTES instead of buffering it under the JSON limit.
MULTIPART_UPLOAD_PATHS: set[str] = set()
# Routes (a workload's) that spool an NDJSON body as /v1/batches does, by path pattern
# (their paths hold ids): streamed under PGBATCH_API_MAX_UPLOAD_BYTES, not buffered.
NDJSON_UPLOAD_PATHS: list[re.Pattern[str]] = []


def _error(
    status: int,
    code: str,
    message: str,
    field: str | None,
    headers: dict[str, str] | None = None,
    *,
    path: str = "",
) -> JSONResponse:
    for prefix, shape in ERROR_SHAPES.items():
        if path.startswith(prefix):
            return shape(status, code, message, field, headers)
    return JSONResponse(error_body(code, message, field), status_code=status, headers=headers)


# A stalled client is not waited for again: its connection closes after the answer.
_CLOSE = {"Connection": "close"}


@dataclass(frozen=True, slots=True)
class _Limits:
    json_bytes: int
    upload_bytes: int
    idle_s: float
    total_s: float


class _BodyError(Exception):
    """A body that is too large, too slow, or abandoned by its client."""

    def __init__(self, error: ApiError | None) -> None:
        super().__init__()
        # None: the client left, there is nobody to answer.
        self.error = error


def _response(error: ApiError, scope: Scope) -> JSONResponse:
    return _error(
        error.status, error.code, error.message, error.field, error.headers, path=scope["path"]
    )


class RequestGuard:
    """The checks every HTTP request passes before routing (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        settings: Settings,
        *,
        auth_enabled: bool,
        request_scope: Callable[[float], AbstractContextManager[None]],
    ) -> None:
        self.app = app
        self.settings = settings
        self.auth_enabled = auth_enabled
        # App.request_scope: the pool wait of an API request, and a checked connection.
        self.request_scope = request_scope
        self.limits = _Limits(
            json_bytes=settings.api_max_json_bytes,
            upload_bytes=settings.api_max_upload_bytes,
            idle_s=settings.api_body_idle_timeout_s,
            total_s=settings.api_body_timeout_s,
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._misdirected(scope) or self._forbidden_origin(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        with self.request_scope(self.settings.api_pool_timeout_s):
            if _has_body(scope):
                if self._is_upload(scope):
                    limit = self.limits.upload_bytes
                    if self._declared_too_large(scope, limit):
                        # Refused before the route takes one of the tenant's upload slots.
                        await _response(self._too_large(limit, True), scope)(scope, receive, send)
                        return
                    receive = self._streamed_body(receive)
                else:
                    try:
                        receive = await self._buffered_body(scope, receive)
                    except _BodyError as exc:
                        await _answer(exc, scope, receive, send)
                        return
            await self._app_with_last_answer(scope, receive, send)

    def _misdirected(self, scope: Scope) -> JSONResponse | None:
        # Without tokens the server trusts whoever reaches it, which must be this machine.
        # A web page whose host name was re-bound to 127.0.0.1 (DNS rebinding) reaches it
        # too, but still sends its own host name: answer only requests for a loopback name.
        if self.auth_enabled:
            return None
        host = _header(scope, b"host") or ""
        if is_loopback_host(host):
            return None
        return _error(
            421,
            "misdirected_request",
            f"this server answers only localhost, 127.0.0.1 or [::1] without API tokens, not "
            f"Host {host[:100]!r}; set PGBATCH_API_TOKENS to serve other names",
            "Host",
            path=scope["path"],
        )

    def _forbidden_origin(self, scope: Scope) -> JSONResponse | None:
        # A page on another site may still send a "simple" write (a form POST) to a
        # loopback name: without tokens, a write must come from no page or a loopback one.
        if self.auth_enabled or scope["method"] not in WRITE_METHODS:
            return None
        origin = _header(scope, b"origin")
        if origin is None or _origin_is_loopback(origin):
            return None
        return _error(
            403,
            "forbidden_origin",
            f"writes from the web page at {origin[:100]!r} are refused: without API tokens "
            "only pages served from localhost may write",
            "Origin",
            path=scope["path"],
        )

    def _is_upload(self, scope: Scope) -> bool:
        content_type = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
        return scope["method"] == "POST" and (
            (
                content_type in NDJSON_MEDIA_TYPES
                and (
                    scope["path"] == "/v1/batches"
                    or any(p.fullmatch(scope["path"]) for p in NDJSON_UPLOAD_PATHS)
                )
            )
            # A multipart upload to a route that spools it (the OpenAI Files API) streams
            # under the same limit; to any other route it is a body like JSON, bounded
            # by PGBATCH_API_MAX_JSON_BYTES, since that route reads it whole.
            or (scope["path"] in MULTIPART_UPLOAD_PATHS and content_type == "multipart/form-data")
        )

    def _too_large(self, limit: int, upload: bool) -> ApiError:
        what = (
            f"an upload ({NDJSON}, or a multipart file) may be at most {limit} bytes "
            f"(limit {limit}, PGBATCH_API_MAX_UPLOAD_BYTES); split it"
            if upload
            else f"a request body may be at most {limit} bytes (limit {limit}, "
            f"PGBATCH_API_MAX_JSON_BYTES); stream larger batches as {NDJSON}"
        )
        # No "Connection: close": the server reads and drops the rest of the body for a
        # bounded time (server.HeaderTimeoutH11Protocol), so the client, still sending,
        # reads this answer instead of a reset connection.
        return ApiError(413, "body_too_large", what, field="body")

    def _timed_out(self) -> ApiError:
        return ApiError(
            408,
            "body_timeout",
            f"the request body stalled (nothing for {self.limits.idle_s} s, or not all of it "
            f"within {self.limits.total_s} s)",
            field="body",
            headers=_CLOSE,
        )

    def _declared_too_large(self, scope: Scope, limit: int) -> bool:
        declared = _header(scope, b"content-length")
        return declared is not None and declared.isdigit() and int(declared) > limit

    async def _next_chunk(
        self, receive: Receive, deadline: float, size: int, limit: int, upload: bool
    ) -> tuple[Message, int]:
        """Receive one body message within the idle and total timeouts; count its bytes."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(min(self.limits.idle_s, max(0.0, deadline - loop.time()))):
                message = await receive()
        except TimeoutError:
            raise _BodyError(self._timed_out()) from None
        if message["type"] == "http.disconnect":
            raise _BodyError(None)
        size += len(message.get("body", b""))
        if size > limit:
            raise _BodyError(self._too_large(limit, upload))
        return message, size

    async def _buffered_body(self, scope: Scope, receive: Receive) -> Receive:
        """Read a whole (JSON) body within the limits; return a receive that replays it.

        Routes parse such a body in memory anyway, so reading it here costs nothing more,
        and the route (FastAPI's parser included) never waits on the client.
        """
        limit = self.limits.json_bytes
        if self._declared_too_large(scope, limit):
            raise _BodyError(self._too_large(limit, upload=False))
        deadline = asyncio.get_running_loop().time() + self.limits.total_s
        chunks: list[bytes] = []
        size = 0
        while True:
            message, size = await self._next_chunk(receive, deadline, size, limit, upload=False)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replay: Message | None = {"type": "http.request", "body": b"".join(chunks)}

        async def replaying() -> Message:
            nonlocal replay
            if replay is not None:
                message, replay = replay, None
                return message
            return await receive()  # after the body: a disconnect, for streamed answers

        return replaying

    def _streamed_body(self, receive: Receive) -> Receive:
        """Return a receive that enforces the upload limit and timeouts as the body streams.

        Raising from it ends the route's read with an ApiError (413/408), or a
        ClientDisconnect when the client left (answered 499 by the error handlers).
        """
        limit = self.limits.upload_bytes
        deadline = asyncio.get_running_loop().time() + self.limits.total_s
        size = 0
        done = False

        async def checked() -> Message:
            nonlocal size, done
            if done:
                return await receive()
            try:
                message, size = await self._next_chunk(receive, deadline, size, limit, True)
            except _BodyError as exc:
                if exc.error is None:
                    return {"type": "http.disconnect"}
                raise exc.error from None
            done = not message.get("more_body", False)
            return message

        return checked

    async def _app_with_last_answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        # An exception that reaches Starlette's outermost handler is answered 500 and then
        # re-raised to the server, which logs it a second time and drops the client's
        # keep-alive connection: answer it here instead, once.
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking)
        except Exception:
            if started:
                raise  # too late for an answer: the server closes the connection
            _log.exception("unhandled error in an API request")
            response = _error(
                500,
                "internal_error",
                "internal error; the server log has details",
                None,
                path=scope["path"],
            )
            await response(scope, receive, send)


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    if length is not None:
        return length != "0"
    return _header(scope, b"transfer-encoding") is not None


async def _answer(exc: _BodyError, scope: Scope, receive: Receive, send: Send) -> None:
    if exc.error is not None:
        await _response(exc.error, scope)(scope, receive, send)
        return
    # The client is gone: this answer reaches no one (the server drops it), but the
    # metrics middleware around us counts the request as 499, not as an error.
    await send({"type": "http.response.start", "status": CLIENT_CLOSED, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class UploadSlots:
    """At most `per_tenant` NDJSON uploads of each tenant in progress at once."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._active: Counter[str] = Counter()

    def active(self, tenant: str) -> int:
        """Return how many uploads `tenant` has in progress (a test signal, too)."""
        return self._active[tenant]

    @contextlib.asynccontextmanager
    async def slot(self, tenant: str) -> AsyncIterator[None]:
        """Hold one of the tenant's upload slots, or raise 429 when all are taken."""
        if self._active[tenant] >= self.per_tenant:
            raise ApiError(
                429,
                "too_many_uploads",
                f"this tenant already has {self.per_tenant} uploads in progress (limit "
                f"{self.per_tenant}, PGBATCH_API_MAX_UPLOADS_PER_TENANT); retry when one ends",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self._active[tenant] += 1
        try:
            yield
        finally:
            self._active[tenant] -= 1
            if not self._active[tenant]:
                del self._active[tenant]
