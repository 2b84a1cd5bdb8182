"""Model clients for the demo: a deterministic fake and an OpenAI-compatible HTTP client."""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
from collections.abc import Mapping
from typing import Any, Protocol

import httpx

__all__ = [
    "FakeModelClient",
    "ModelClient",
    "ModelError",
    "OpenAICompatibleClient",
    "client_from_settings",
]

DEFAULT_MODEL = "gpt-4o-mini"
DEFAULT_FAKE_LATENCY_MS = 2.0
DEFAULT_FAKE_ERROR_RATE = 0.01

# Long enough to diagnose a failure from the item's stored error, short enough
# that an HTML error page does not bloat every failed row.
_EXCERPT_CHARS = 200
# 2**60 times any sane base already exceeds any cap; bounding the exponent keeps
# the float multiplication from overflowing on absurd retry counts.
_MAX_BACKOFF_EXPONENT = 60


class ModelClient(Protocol):
    """Complete prompts against a language model."""

    async def complete(self, prompt: str) -> str:
        """Return the model's completion for one prompt."""
        ...

    async def aclose(self) -> None:
        """Release any resources held by the client."""
        ...


class ModelError(Exception):
    """Signal a per-prompt failure that the caller should record as that item's error."""


def _excerpt(text: str) -> str:
    # Collapsing whitespace keeps the excerpt on one line in logs and tables.
    flat = " ".join(text.split())
    if len(flat) > _EXCERPT_CHARS:
        return flat[:_EXCERPT_CHARS] + "..."
    return flat


def _unit_interval(data: bytes) -> float:
    # A hash rather than a random.Random stream makes the outcome a pure function
    # of the input, so a retried or re-run prompt behaves identically.
    digest = hashlib.sha256(data).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class FakeModelClient:
    """Answer prompts deterministically without any network access."""

    def __init__(
        self, latency_ms: float = DEFAULT_FAKE_LATENCY_MS, error_rate: float = 0.0, seed: int = 0
    ) -> None:
        """Configure the simulated latency, failure rate and failure seed."""
        # Negated comparisons also reject NaN, which passes every ordinary range check.
        if not (latency_ms >= 0 and math.isfinite(latency_ms)):
            raise ValueError(f"latency_ms must be a finite number >= 0, got {latency_ms!r}")
        if not (0.0 <= error_rate <= 1.0):
            raise ValueError(f"error_rate must be between 0 and 1, got {error_rate!r}")
        self.latency_ms = latency_ms
        self.error_rate = error_rate
        self.seed = seed

    def fails(self, prompt: str) -> bool:
        """Return whether this client always fails the given prompt."""
        return _unit_interval(f"{self.seed}:{prompt}".encode()) < self.error_rate

    async def complete(self, prompt: str) -> str:
        """Return a summary derived from the prompt, or raise ModelError for failing prompts."""
        await asyncio.sleep(self.latency_ms / 1000)
        if self.fails(prompt):
            raise ModelError(
                f"fake model error (seed={self.seed}, error_rate={self.error_rate}) "
                f"for prompt {_excerpt(prompt)!r}"
            )
        return f"summary:{hashlib.sha256(prompt.encode()).hexdigest()[:16]}"

    async def aclose(self) -> None:
        """Do nothing; the fake holds no resources."""


class OpenAICompatibleClient:
    """Call an OpenAI-compatible /chat/completions endpoint with bounded concurrency and retries."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        max_concurrency: int = 16,
        max_retries: int = 5,
        timeout_s: float = 60.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 20.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        """Validate the settings and open one shared HTTP client."""
        url = httpx.URL(base_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an absolute http(s) URL, got {base_url!r}")
        if not model:
            raise ValueError("model must be a non-empty string")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries!r}")
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s!r}")
        if not (backoff_base_s >= 0 and math.isfinite(backoff_base_s)):
            raise ValueError(f"backoff_base_s must be a finite number >= 0, got {backoff_base_s!r}")
        if not (backoff_max_s >= 0 and math.isfinite(backoff_max_s)):
            raise ValueError(f"backoff_max_s must be a finite number >= 0, got {backoff_max_s!r}")

        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._semaphore = asyncio.Semaphore(max_concurrency)
        # Backoff jitter needs no reproducibility, only independence between clients.
        self._rng = random.Random()
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # Sizing the pool to the semaphore stops requests that already hold a slot
        # from queueing again for a connection (and hitting the pool timeout).
        limits = httpx.Limits(
            max_connections=max_concurrency, max_keepalive_connections=max_concurrency
        )
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout_s),
            limits=limits,
            transport=transport,
        )

    def _backoff_s(self, attempt: int) -> float:
        # Full jitter spreads synchronized retries from many workers over the whole window.
        ceiling = self.backoff_base_s * 2.0 ** min(attempt, _MAX_BACKOFF_EXPONENT)
        return self._rng.uniform(0.0, min(self.backoff_max_s, ceiling))

    def _retry_after_s(self, response: httpx.Response) -> float | None:
        raw = response.headers.get("Retry-After")
        if raw is None:
            return None
        try:
            seconds = float(raw.strip())
        except ValueError:
            # An HTTP-date is allowed by the spec but rare from model APIs; plain
            # backoff is a safe fallback.
            return None
        if not (seconds >= 0 and math.isfinite(seconds)):
            return None
        return min(seconds, self.backoff_max_s)

    def _parse(self, response: httpx.Response) -> str:
        try:
            body: Any = response.json()
        except ValueError as exc:
            raise ModelError(
                f"malformed JSON in HTTP {response.status_code} response from {self.url}: "
                f"{_excerpt(response.text)!r}"
            ) from exc
        try:
            content = body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise ModelError(
                f"response from {self.url} has no choices[0].message.content: "
                f"{_excerpt(response.text)!r}"
            ) from exc
        if not isinstance(content, str):
            raise ModelError(
                f"choices[0].message.content from {self.url} is {type(content).__name__}, "
                f"not a string: {_excerpt(response.text)!r}"
            )
        return content

    async def complete(self, prompt: str) -> str:
        """Return choices[0].message.content for the prompt, retrying transient failures."""
        payload = {"model": self.model, "messages": [{"role": "user", "content": prompt}]}
        attempts = self.max_retries + 1
        last_failure = "no attempt made"
        for attempt in range(attempts):
            async with self._semaphore:
                try:
                    response = await self._client.post(self.url, json=payload)
                except httpx.TransportError as exc:
                    # Covers timeouts, refused/reset connections and truncated responses.
                    last_failure = f"{type(exc).__name__}: {exc}"
                    delay = self._backoff_s(attempt)
                except httpx.HTTPError as exc:
                    raise ModelError(
                        f"request to {self.url} failed: {type(exc).__name__}: {exc}"
                    ) from exc
                else:
                    status = response.status_code
                    if status == 429 or status >= 500:
                        last_failure = f"HTTP {status}: {_excerpt(response.text)!r}"
                        retry_after = self._retry_after_s(response)
                        delay = self._backoff_s(attempt) if retry_after is None else retry_after
                    elif 200 <= status < 300:
                        return self._parse(response)
                    else:
                        raise ModelError(
                            f"HTTP {status} from {self.url}: {_excerpt(response.text)!r}"
                        )
            # Sleeping outside the semaphore lets other prompts use the slot while
            # this one waits out its backoff.
            if attempt + 1 < attempts:
                await asyncio.sleep(delay)
        raise ModelError(
            f"giving up on {self.url} after {attempts} attempts; last failure: {last_failure}"
        )

    async def aclose(self) -> None:
        """Close the shared HTTP client."""
        await self._client.aclose()


def _env_float(
    env: Mapping[str, str], name: str, default: float, low: float, high: float = math.inf
) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if not (low <= value <= high) or not math.isfinite(value):
        bounds = f">= {low}" if math.isinf(high) else f"between {low} and {high}"
        raise ValueError(f"{name} must be a finite number {bounds}, got {raw!r}")
    return value


def client_from_settings(env: Mapping[str, str] = os.environ) -> ModelClient:
    """Build the real client when PGBATCH_LLM_BASE_URL is set, else the fake one."""
    base_url = env.get("PGBATCH_LLM_BASE_URL", "").strip()
    if base_url:
        return OpenAICompatibleClient(
            base_url=base_url,
            # An exported-but-empty key means "no key", not "send an empty bearer token".
            api_key=env.get("PGBATCH_LLM_API_KEY") or None,
            model=env.get("PGBATCH_LLM_MODEL", "").strip() or DEFAULT_MODEL,
        )
    return FakeModelClient(
        latency_ms=_env_float(env, "PGBATCH_FAKE_LATENCY_MS", DEFAULT_FAKE_LATENCY_MS, 0.0),
        error_rate=_env_float(env, "PGBATCH_FAKE_ERROR_RATE", DEFAULT_FAKE_ERROR_RATE, 0.0, 1.0),
    )
