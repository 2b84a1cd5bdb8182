"""Tests for the LLM example's model clients against a real loopback HTTP stub."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any

import httpx
import pytest

from pgbatch.demo.model_clients import (
    FakeModelClient,
    ModelError,
    OpenAICompatibleClient,
    client_from_settings,
)

# A safety net so a broken client fails the test instead of hanging the suite;
# nothing below relies on it for synchronisation.
GUARD_S = 5.0


@dataclass
class Request:
    """One request as received by the stub server."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float

    def json(self) -> Any:
        """Decode the request body as JSON."""
        return json.loads(self.body)


@dataclass
class Reply:
    """A response the stub server sends; drop=True closes the socket without replying."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False


def ok(content: str) -> Reply:
    """Build a successful chat-completions reply."""
    payload = {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
    return Reply(200, json.dumps(payload).encode())


Handler = Callable[["StubServer", Request, int], Awaitable[Reply]]


def scripted(replies: Sequence[Reply]) -> Handler:
    """Reply with the given sequence, repeating the last reply once it is exhausted."""

    async def handle(server: StubServer, request: Request, index: int) -> Reply:
        return replies[min(index, len(replies) - 1)]

    return handle


class StubServer:
    """Minimal HTTP/1.1 server on 127.0.0.1 that records requests and in-flight counts."""

    def __init__(self, handler: Handler, max_requests: int = 50) -> None:
        self.handler = handler
        self.max_requests = max_requests
        self.requests: list[Request] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.release = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.base_url = ""

    async def __aenter__(self) -> StubServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release.set()
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        # Python 3.11's wait_closed does not wait for connection handlers; joining them
        # here keeps handler tasks from outliving the test's event loop.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, path, _ = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            request = Request(method, path, headers, body, time.monotonic())
            index = len(self.requests)
            self.requests.append(request)
            if index >= self.max_requests:
                # Bounds the damage if a client bug turns into a retry storm; the test's
                # request-count assertions then report it.
                return
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                reply = await self.handler(self, request, index)
            finally:
                self.in_flight -= 1
            if reply.drop:
                return
            reason = HTTPStatus(reply.status).phrase
            lines = [f"HTTP/1.1 {reply.status} {reason}"]
            lines += [f"{k}: {v}" for k, v in reply.headers.items()]
            lines += [
                "Content-Type: application/json",
                f"Content-Length: {len(reply.body)}",
                "Connection: close",
            ]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + reply.body)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def make_client(server: StubServer, **kwargs: Any) -> OpenAICompatibleClient:
    """Build a client aimed at the stub with tiny backoffs and no environment proxies."""
    options: dict[str, Any] = {
        "api_key": "sk-test",
        "model": "test-model",
        "max_retries": 3,
        "timeout_s": 2.0,
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.005,
        # An explicit transport makes httpx ignore HTTP(S)_PROXY, keeping traffic on loopback.
        "transport": httpx.AsyncHTTPTransport(),
    }
    options.update(kwargs)
    return OpenAICompatibleClient(server.base_url, **options)


# --- OpenAICompatibleClient -------------------------------------------------------------


@pytest.mark.asyncio
async def test_success_returns_content_and_sends_auth_and_model() -> None:
    async with StubServer(scripted([ok("hello there")])) as server:
        client = make_client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                result = await client.complete("Summarise this.")
        finally:
            await client.aclose()

    assert result == "hello there"
    assert len(server.requests) == 1
    request = server.requests[0]
    assert request.method == "POST"
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.json() == {
        "model": "test-model",
        "messages": [{"role": "user", "content": "Summarise this."}],
    }


@pytest.mark.asyncio
async def test_no_auth_header_without_key() -> None:
    async with StubServer(scripted([ok("x")])) as server:
        client = make_client(server, api_key=None)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await client.complete("p") == "x"
        finally:
            await client.aclose()

    assert "authorization" not in server.requests[0].headers


@pytest.mark.asyncio
async def test_429_then_200_is_retried() -> None:
    replies = [Reply(429, b'{"error":"slow down"}'), ok("after retry")]
    async with StubServer(scripted(replies)) as server:
        client = make_client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await client.complete("p") == "after retry"
        finally:
            await client.aclose()

    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_retry_after_header_is_respected() -> None:
    replies = [Reply(429, b"{}", {"Retry-After": "0.2"}), ok("done")]
    async with StubServer(scripted(replies)) as server:
        client = make_client(server, backoff_max_s=1.0)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await client.complete("p") == "done"
        finally:
            await client.aclose()

    first, second = server.requests
    # The jittered backoff alone would be at most a few ms with these settings.
    assert second.received_at - first.received_at >= 0.19


@pytest.mark.asyncio
async def test_retry_after_is_capped_at_backoff_max() -> None:
    replies = [Reply(503, b"{}", {"Retry-After": "120"}), ok("done")]
    async with StubServer(scripted(replies)) as server:
        client = make_client(server, backoff_max_s=0.01)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await client.complete("p") == "done"
        finally:
            await client.aclose()

    first, second = server.requests
    assert second.received_at - first.received_at < 1.0


@pytest.mark.asyncio
async def test_persistent_500_exhausts_retries() -> None:
    async with StubServer(scripted([Reply(500, b"upstream exploded")])) as server:
        client = make_client(server, max_retries=2)
        try:
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(ModelError, match="3 attempts") as info:
                    await client.complete("p")
        finally:
            await client.aclose()

    assert len(server.requests) == 3
    assert "500" in str(info.value)
    assert "upstream exploded" in str(info.value)


@pytest.mark.asyncio
async def test_400_fails_immediately_without_retry() -> None:
    body = b'{"error": {"message": "context length exceeded"}}'
    async with StubServer(scripted([Reply(400, body), ok("never")])) as server:
        client = make_client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(ModelError) as info:
                    await client.complete("p")
        finally:
            await client.aclose()

    assert len(server.requests) == 1
    message = str(info.value)
    assert "400" in message
    assert "context length exceeded" in message


@pytest.mark.asyncio
async def test_malformed_json_is_model_error() -> None:
    async with StubServer(scripted([Reply(200, b"<html>not json</html>")])) as server:
        client = make_client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(ModelError, match="malformed JSON"):
                    await client.complete("p")
        finally:
            await client.aclose()

    assert len(server.requests) == 1


@pytest.mark.asyncio
async def test_missing_content_is_model_error() -> None:
    async with StubServer(scripted([Reply(200, b'{"choices": []}')])) as server:
        client = make_client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                with pytest.raises(ModelError, match=r"choices\[0\]\.message\.content"):
                    await client.complete("p")
        finally:
            await client.aclose()


@pytest.mark.asyncio
async def test_dropped_connection_is_retried() -> None:
    async with StubServer(scripted([Reply(drop=True), ok("recovered")])) as server:
        client = make_client(server)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await client.complete("p") == "recovered"
        finally:
            await client.aclose()

    assert len(server.requests) == 2


@pytest.mark.asyncio
async def test_timeout_is_retried() -> None:
    async def handle(server: StubServer, request: Request, index: int) -> Reply:
        if index == 0:
            # Held until the server shuts down, so the client's read timeout fires.
            await server.release.wait()
        return ok("second time lucky")

    async with StubServer(handle) as server:
        client = make_client(server, timeout_s=0.1)
        try:
            async with asyncio.timeout(GUARD_S):
                assert await client.complete("p") == "second time lucky"
        finally:
            await client.aclose()

    assert len(server.requests) == 2


class CountingTransport(httpx.AsyncBaseTransport):
    """Wrap a real transport and record how many requests it handles at once."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Forward the request while counting it as in flight."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self.inner.handle_async_request(request)
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        """Close the wrapped transport."""
        await self.inner.aclose()


@pytest.mark.asyncio
async def test_concurrency_is_bounded_by_semaphore() -> None:
    limit = 3

    async def handle(server: StubServer, request: Request, index: int) -> Reply:
        # Holding requests until `limit` are in flight at once proves the client really
        # runs them in parallel; after that everything is let through.
        if server.in_flight >= limit:
            server.release.set()
        await server.release.wait()
        return ok(request.json()["messages"][0]["content"].upper())

    transport = CountingTransport()
    async with StubServer(handle) as server:
        client = make_client(server, max_concurrency=limit, transport=transport)
        try:
            async with asyncio.timeout(GUARD_S):
                results = await asyncio.gather(*(client.complete(f"p{i}") for i in range(12)))
        finally:
            await client.aclose()

    assert results == [f"P{i}" for i in range(12)]
    assert len(server.requests) == 12
    assert 1 < server.max_in_flight <= limit
    # Every call reaches the transport without suspending first, so an unbounded
    # client would show all 12 here even if the server happened to see fewer.
    assert transport.max_in_flight <= limit


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_retries": -1}, "max_retries"),
        ({"timeout_s": 0.0}, "timeout_s"),
        ({"backoff_base_s": -1.0}, "backoff_base_s"),
        ({"backoff_max_s": float("nan")}, "backoff_max_s"),
        ({"base_url": "localhost:8000"}, "base_url"),
        ({"model": ""}, "model"),
    ],
)
def test_openai_client_rejects_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    options: dict[str, Any] = {
        "base_url": "http://127.0.0.1:1/v1",
        "api_key": None,
        "model": "m",
    }
    options.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        OpenAICompatibleClient(**options)


# --- FakeModelClient --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_fake_is_deterministic_per_prompt() -> None:
    first = FakeModelClient(latency_ms=0)
    second = FakeModelClient(latency_ms=0)
    a = await first.complete("alpha")
    assert a == await first.complete("alpha")
    assert a == await second.complete("alpha")
    assert a.startswith("summary:")
    assert a != await first.complete("beta")


async def failing_prompts(client: FakeModelClient, prompts: Sequence[str]) -> set[str]:
    """Return the prompts for which the client raises ModelError."""
    failed = set()
    for prompt in prompts:
        try:
            await client.complete(prompt)
        except ModelError:
            failed.add(prompt)
    return failed


PROMPTS = [f"document {i}" for i in range(400)]


@pytest.mark.asyncio
async def test_fake_error_set_depends_only_on_seed_and_prompt() -> None:
    one = await failing_prompts(FakeModelClient(latency_ms=0, error_rate=0.25, seed=7), PROMPTS)
    two = await failing_prompts(FakeModelClient(latency_ms=0, error_rate=0.25, seed=7), PROMPTS)
    other = await failing_prompts(FakeModelClient(latency_ms=0, error_rate=0.25, seed=8), PROMPTS)

    assert one == two
    assert one != other
    # Hash-based, so this is a fixed fact about these prompts, not a flaky estimate.
    assert 50 < len(one) < 150


@pytest.mark.asyncio
async def test_fake_retried_prompt_fails_again() -> None:
    client = FakeModelClient(latency_ms=0, error_rate=0.5, seed=3)
    failed = await failing_prompts(client, PROMPTS[:40])
    assert failed
    assert await failing_prompts(client, sorted(failed)) == failed


@pytest.mark.asyncio
async def test_fake_error_rate_extremes() -> None:
    assert await failing_prompts(FakeModelClient(latency_ms=0, error_rate=0.0), PROMPTS) == set()
    assert await failing_prompts(FakeModelClient(latency_ms=0, error_rate=1.0), PROMPTS) == set(
        PROMPTS
    )


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"latency_ms": -1.0}, "latency_ms"),
        ({"latency_ms": float("inf")}, "latency_ms"),
        ({"error_rate": -0.1}, "error_rate"),
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": float("nan")}, "error_rate"),
    ],
)
def test_fake_rejects_bad_arguments(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        FakeModelClient(**kwargs)


# --- client_from_settings ---------------------------------------------------------------


def test_settings_default_to_fake() -> None:
    client = client_from_settings({})
    assert isinstance(client, FakeModelClient)
    assert client.latency_ms == 2.0
    assert client.error_rate == 0.01


def test_settings_configure_fake() -> None:
    env = {"PGBATCH_FAKE_LATENCY_MS": "0.5", "PGBATCH_FAKE_ERROR_RATE": "0.2"}
    client = client_from_settings(env)
    assert isinstance(client, FakeModelClient)
    assert client.latency_ms == 0.5
    assert client.error_rate == 0.2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PGBATCH_FAKE_LATENCY_MS", "fast"),
        ("PGBATCH_FAKE_LATENCY_MS", "-3"),
        ("PGBATCH_FAKE_ERROR_RATE", "lots"),
        ("PGBATCH_FAKE_ERROR_RATE", "2"),
    ],
)
def test_settings_reject_bad_numbers(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=name):
        client_from_settings({name: value})


@pytest.mark.asyncio
async def test_settings_select_openai_client() -> None:
    env = {"PGBATCH_LLM_BASE_URL": "http://127.0.0.1:9/v1", "PGBATCH_LLM_API_KEY": "k"}
    client = client_from_settings(env)
    try:
        assert isinstance(client, OpenAICompatibleClient)
        assert client.model == "gpt-4o-mini"
        assert client.url == "http://127.0.0.1:9/v1/chat/completions"
    finally:
        await client.aclose()

    client = client_from_settings({**env, "PGBATCH_LLM_MODEL": "llama-3"})
    try:
        assert isinstance(client, OpenAICompatibleClient)
        assert client.model == "llama-3"
    finally:
        await client.aclose()
