"""Send one OpenAI-compatible request to the configured upstream and say what came back.

The client never raises for what the upstream did: an HTTP error, a timeout or a refused
connection is a `Reply` that says whether retrying can help (429, 5xx, timeouts and lost
connections) and, for a 429, how long the upstream asked to wait. Retrying, pausing the
key and counting attempts are the caller's: they are shared between workers.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

__all__ = ["Reply", "UpstreamClient", "UpstreamConfig", "retry_after_s"]

# Long enough for a long completion of a large model; a hung upstream still frees the
# slot, and the request is retried.
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_MAX_CONCURRENCY = 64
# A 429 without a usable hint waits this long before the key is tried again.
DEFAULT_RETRY_AFTER_S = 1.0
# An upstream asking for longer than this is capped: the lease and the shard's progress
# matter more than the hint's precision.
MAX_RETRY_AFTER_S = 300.0
# The part of an unparseable body kept in the error line.
_EXCERPT_CHARS = 500
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?"
                       r"(?:(\d+(?:\.\d+)?)ms)?$")  # fmt: skip


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """Where requests go: base URL (…/v1), key, model names mapped to the upstream's."""

    base_url: str
    # Never shown: not in repr (logs, tracebacks), not in any API or CLI answer.
    api_key: str | None = field(default=None, repr=False)
    models: Mapping[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY

    def __post_init__(self) -> None:
        """Refuse a configuration that could not send a request, naming the field."""
        url = httpx.URL(self.base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, not {self.base_url!r}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, not {self.timeout_s!r}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, not {self.max_concurrency!r}")

    def endpoint_url(self, url: str) -> str:
        """Return the upstream URL of a batch endpoint (`/v1/chat/completions`…)."""
        base = self.base_url.rstrip("/")
        path = url.removeprefix("/v1") if base.endswith("/v1") else url
        return base + path


@dataclass(frozen=True, slots=True)
class Reply:
    """What the upstream answered, or why there was no answer."""

    status_code: int | None
    body: Any = None
    request_id: str | None = None
    # Set for a 429 (and a 503 that names one): how long the upstream asked to wait.
    retry_after_s: float | None = None
    # Set when there was no HTTP answer: a timeout, a refused or dropped connection.
    failure: str | None = None
    elapsed_s: float = 0.0
    # False when `send`'s gate held the request back (its key was paused meanwhile): it
    # never left, so it costs no budget and no attempt.
    sent: bool = True

    @property
    def ok(self) -> bool:
        """Tell whether the request succeeded (2xx)."""
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def retryable(self) -> bool:
        """Tell whether sending the same request again can succeed."""
        code = self.status_code
        return code is None or code == 429 or code == 408 or code >= 500

    @property
    def rate_limited(self) -> bool:
        """Tell whether the upstream refused for a rate limit (the key should pause)."""
        return self.status_code == 429


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Read how long to wait from `retry-after-ms`, `retry-after` or `x-ratelimit-reset-*`.

    Accepts seconds, an HTTP date, and OpenAI's durations (`1s`, `6m0s`, `20ms`). Returns
    None when no header says; caps at MAX_RETRY_AFTER_S.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    candidates: list[float] = []
    if (raw := lowered.get("retry-after-ms")) is not None:
        value = _number(raw)
        if value is not None:
            candidates.append(value / 1000)
    if not candidates and (raw := lowered.get("retry-after")) is not None:
        value = _number(raw)
        if value is None:
            try:
                when = email.utils.parsedate_to_datetime(raw).timestamp()
            except (TypeError, ValueError):
                when = None
            if when is not None:
                value = max(0.0, when - (time.time() if now is None else now))
        if value is not None:
            candidates.append(value)
    if not candidates:
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            if (raw := lowered.get(name)) is not None and (value := _duration(raw)) is not None:
                candidates.append(value)
    if not candidates:
        return None
    return min(MAX_RETRY_AFTER_S, max(candidates))


def _number(raw: str) -> float | None:
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 and math.isfinite(value) else None


def _duration(raw: str) -> float | None:
    match = _DURATION.match(raw.strip())
    if not match or not any(match.groups()):
        return _number(raw)
    hours, minutes, seconds, millis = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds + millis / 1000


class UpstreamClient:
    """One pooled HTTP client for an upstream, with bounded requests in flight."""

    def __init__(
        self, config: UpstreamConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        """Open the shared connection pool (sized to the concurrency bound)."""
        self.config = config
        self._slots = asyncio.Semaphore(config.max_concurrency)
        headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        # A pool as large as the bound: a request holding a slot never waits for a socket.
        limits = httpx.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency,
        )
        self._http = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(config.timeout_s),
            limits=limits,
            transport=transport,
        )

    async def send(
        self, url: str, body: Mapping[str, Any], *, gate: Callable[[], bool] | None = None
    ) -> Reply:
        """Send one request (its model mapped to the upstream's name) and return the reply.

        `gate`, asked once a concurrency slot is free, may hold the request back (a 429
        paused its key while it waited for the slot): the reply then has `sent=False`.
        """
        model = body.get("model")
        if isinstance(model, str) and model in self.config.models:
            body = {**body, "model": self.config.models[model]}
        target = self.config.endpoint_url(url)
        started = time.monotonic()
        async with self._slots:
            if gate is not None and not gate():
                return Reply(None, failure="held back: the key is paused", sent=False)
            try:
                response = await self._http.post(
                    target,
                    content=orjson.dumps(body),
                    headers={"content-type": "application/json"},
                )
            except httpx.TimeoutException as exc:
                failure = f"timeout after {self.config.timeout_s:g} s: {type(exc).__name__}"
                return Reply(None, failure=failure, elapsed_s=time.monotonic() - started)
            except httpx.TransportError as exc:
                return Reply(None, failure=f"{type(exc).__name__}: {exc}",
                             elapsed_s=time.monotonic() - started)  # fmt: skip
        elapsed = time.monotonic() - started
        try:
            parsed: Any = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            parsed = {"error": {"message": response.text[:_EXCERPT_CHARS],
                                "type": "upstream_error", "code": "invalid_json"}}  # fmt: skip
        wait = None
        if response.status_code in (429, 503):
            wait = retry_after_s(response.headers)
            if wait is None and response.status_code == 429:
                wait = DEFAULT_RETRY_AFTER_S
        return Reply(
            response.status_code,
            parsed,
            request_id=response.headers.get("x-request-id"),
            retry_after_s=wait,
            elapsed_s=elapsed,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()
