"""A local OpenAI-compatible server for the demo, tests and benchmarks: no network, no model.

It answers `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings` and `/v1/responses`
with deterministic bodies and real-looking `usage`, enforces requests and tokens per
minute over a sliding 60 s window with 429 + `Retry-After` (as OpenAI counts them: the
prompt estimate plus the answer's cap, at admission), injects latency and errors, and
records every request so a test can check what reached it and when.

Markers in a prompt steer one request: `[fake:400]` answers 400, `[fake:500]` 500,
`[fake:hang]` never answers (a timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from pgbatch.workloads.llm.requests import ENDPOINTS
from pgbatch.workloads.llm.usage import cache_key, completion_cap, estimate_tokens

__all__ = ["FakeLimits", "FakeUpstream", "Served", "serving"]

WINDOW_S = 60.0
EMBEDDING_DIMENSIONS = 8


@dataclass(slots=True)
class FakeLimits:
    """What the fake enforces and injects; change it while it runs with `set_limits`."""

    rpm: int | None = None
    tpm: int | None = None
    latency_ms: float = 0.0
    # The share of requests answered 500 at random (a flaky upstream).
    error_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class Served:
    """One request the fake received: when, for which endpoint and model, and its answer."""

    at: float
    url: str
    model: str
    status: int
    tokens: int
    key: bytes


@dataclass(slots=True)
class _Window:
    """Requests admitted in the last minute, with the tokens each was charged."""

    admitted: deque[tuple[float, int]] = field(default_factory=deque)
    tokens: int = 0

    def trim(self, now: float) -> None:
        while self.admitted and self.admitted[0][0] <= now - WINDOW_S:
            self.tokens -= self.admitted.popleft()[1]


class FakeUpstream:
    """The fake's state and its ASGI app (`.app`), served by any ASGI server."""

    def __init__(
        self, limits: FakeLimits | None = None, *, api_key: str | None = None, seed: int = 0
    ) -> None:
        """Create a fake enforcing `limits`; with `api_key`, requests must bear it."""
        self.limits = limits or FakeLimits()
        self.api_key = api_key
        self.served: list[Served] = []
        self.calls: Counter[bytes] = Counter()
        self._window = _Window()
        self._random = random.Random(seed)
        self._ids = 0
        routes = [Route(url, self._endpoint(url), methods=["POST"]) for url in ENDPOINTS]
        routes.append(Route("/v1/models", self._models, methods=["GET"]))
        self.app = Starlette(routes=routes)

    def set_limits(self, **changes: Any) -> None:
        """Change limits, latency or error rate while requests are running."""
        for name, value in changes.items():
            setattr(self.limits, name, value)

    def rejected(self) -> int:
        """Return how many requests were answered 429."""
        return sum(1 for s in self.served if s.status == 429)

    def max_in_window(self, window_s: float) -> tuple[int, int]:
        """Return the most requests and tokens admitted in any `window_s` span."""
        admitted = [(s.at, s.tokens) for s in self.served if s.status != 429]
        best_requests = best_tokens = 0
        start = 0
        tokens = 0
        for end, (at, charged) in enumerate(admitted):
            tokens += charged
            while admitted[start][0] <= at - window_s:
                tokens -= admitted[start][1]
                start += 1
            best_requests = max(best_requests, end - start + 1)
            best_tokens = max(best_tokens, tokens)
        return best_requests, best_tokens

    def _endpoint(self, url: str) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            return await self._handle(url, request)

        return handle

    async def _models(self, _: Request) -> Response:
        return _json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def _handle(self, url: str, request: Request) -> Response:
        if self.api_key is not None:
            if request.headers.get("authorization") != f"Bearer {self.api_key}":
                return _error(401, "invalid_api_key", "Incorrect API key provided.")
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(400, "invalid_request_error", "We could not parse the JSON body.")
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            return _error(400, "invalid_request_error", "you must provide a model parameter")
        model = body["model"]
        tokens = estimate_tokens(url, body)
        key = cache_key(url, body)
        now = time.monotonic()
        refusal = self._admit(now, tokens)
        status = 429 if refusal else 200
        prompt = orjson.dumps(body).decode()
        if refusal is None:
            if "[fake:400]" in prompt:
                status = 400
            elif "[fake:500]" in prompt or self._random.random() < self.limits.error_rate:
                status = 500
        self.served.append(Served(now, url, model, status, tokens, key))
        if status == 429:
            assert refusal is not None
            return refusal
        self.calls[key] += 1
        if self.limits.latency_ms:
            await asyncio.sleep(self.limits.latency_ms / 1000)
        if "[fake:hang]" in prompt:
            await asyncio.Event().wait()
        if status == 400:
            return _error(400, "invalid_request_error", "the prompt asked for a 400 ([fake:400])")
        if status == 500:
            return _error(500, "server_error", "The server had an error processing your request.")
        self._ids += 1
        return _json(200, _answer(url, body, f"{self._ids:08x}"), request_id=f"req_{self._ids}")

    def _admit(self, now: float, tokens: int) -> Response | None:
        """Charge the request to the window, or return the 429 that refuses it."""
        window = self._window
        window.trim(now)
        rpm, tpm = self.limits.rpm, self.limits.tpm
        wait_s = 0.0
        if rpm is not None and len(window.admitted) >= rpm:
            wait_s = window.admitted[len(window.admitted) - rpm][0] + WINDOW_S - now
        if tpm is not None and window.tokens + tokens > tpm:
            excess = window.tokens + tokens - tpm
            freed = 0
            for at, charged in window.admitted:
                freed += charged
                if freed >= excess:
                    wait_s = max(wait_s, at + WINDOW_S - now)
                    break
            else:
                wait_s = WINDOW_S  # larger than the whole limit: never admitted
        if wait_s > 0:
            kind = "requests" if rpm is not None and len(window.admitted) >= rpm else "tokens"
            response = _error(429, "rate_limit_exceeded", f"Rate limit reached for {kind}.")
            response.headers["retry-after"] = str(max(1, round(wait_s)))
            response.headers["retry-after-ms"] = str(max(1, round(wait_s * 1000)))
            return response
        window.admitted.append((now, tokens))
        window.tokens += tokens
        return None


@contextlib.asynccontextmanager
async def serving(fake: FakeUpstream, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[str]:
    """Serve the fake over real HTTP on `host` (any free port by default); yield its …/v1 URL."""
    config = uvicorn.Config(
        fake.app, host=host, port=port, log_level="warning", lifespan="off",
        # A `[fake:hang]` request never ends: shutting down must not wait for it.
        timeout_graceful_shutdown=1,
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()  # the bind failed: raise its error
            await asyncio.sleep(0.01)
        bound = server.servers[0].sockets[0].getsockname()
        yield f"http://{host}:{bound[1]}/v1"
    finally:
        server.should_exit = True
        await task


def _json(status: int, body: Any, *, request_id: str | None = None) -> Response:
    headers = {"x-request-id": request_id} if request_id else None
    return Response(orjson.dumps(body), status, headers=headers, media_type="application/json")


def _error(status: int, code: str, message: str) -> Response:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return _json(status, {"error": {"message": message, "type": kind, "param": None, "code": code}})


def _prompt_text(url: str, body: dict[str, Any]) -> str:
    if url == "/v1/chat/completions":
        messages = body.get("messages") or []
        return " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
    if url == "/v1/responses":
        return str(body.get("input", ""))
    return str(body.get("prompt", ""))


def _answer(url: str, body: dict[str, Any], serial: str) -> dict[str, Any]:
    """Return a deterministic answer for the request, with its usage."""
    model = body["model"]
    created = int(time.time())
    if url == "/v1/embeddings":
        inputs = body.get("input")
        values = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": n, "embedding": _vector(orjson.dumps(value))}
            for n, value in enumerate(values)
        ]
        prompt_tokens = estimate_tokens(url, body)
        return {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    text = "echo: " + " ".join(_prompt_text(url, body).split())[:80]
    cap = completion_cap(body)
    completion = min(cap, max(1, len(text) // 4))
    prompt_tokens = max(1, estimate_tokens(url, body) - cap)
    if url == "/v1/responses":
        return {
            "id": f"resp_{serial}",
            "object": "response",
            "created_at": created,
            "status": "completed",
            "model": model,
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": text}],
                }
            ],
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": completion,
                "total_tokens": prompt_tokens + completion,
                "input_tokens_details": {"cached_tokens": 0},
            },
        }
    usage = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    if url == "/v1/completions":
        return {
            "id": f"cmpl-{serial}",
            "object": "text_completion",
            "created": created,
            "model": model,
            "usage": usage,
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
        }
    return {
        "id": f"chatcmpl-{serial}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "usage": usage,
        "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
        ],
    }


def _vector(data: bytes) -> list[float]:
    digest = hashlib.sha256(data).digest()
    return [round(byte / 255 * 2 - 1, 4) for byte in digest[:EMBEDDING_DIMENSIONS]]
