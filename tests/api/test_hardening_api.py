"""Issue 9, the API's part: slow clients, a busy or lost database, DNS rebinding, body
limits, /metrics, disconnects mid-body and recovery after a database restart.

Slow clients are real sockets trickling bytes, so the server sees what an attacker sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from starlette.requests import Request

from pgbatch.api.errors import ApiError
from pgbatch.api.routes import system
from pgbatch.config import Settings
from tests.api.conftest import RunningApi, StartApi
from tests.api.support import assert_error
from tests.helpers import wait_until

# Long enough for any answer on a loaded 2-core machine; what broke took 30 s or forever.
ANSWER_TIMEOUT_S = 10.0
NDJSON = "application/x-ndjson"
TENANTS = ("acme", "globex")


# -- raw HTTP/1.1 over a socket ----------------------------------------------------------------


class RawHttp:
    """One client connection that writes exactly the bytes a test gives it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        """Write `data` now."""
        self.writer.write(data)
        await self.writer.drain()

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """Read one response (status, lower-cased headers, body by Content-Length)."""
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def closed_by_server(self) -> bool:
        """Wait until the server closes this connection (EOF or reset)."""
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            try:
                while await self.reader.read(65536):
                    pass
            except ConnectionError:
                pass
        return True

    def close(self) -> None:
        """Drop the connection."""
        self.writer.close()


@contextlib.asynccontextmanager
async def raw(running: RunningApi) -> AsyncIterator[RawHttp]:
    """Open a raw connection to the API."""
    url = urlsplit(running.base_url)
    assert url.hostname and url.port
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    try:
        yield RawHttp(reader, writer)
    finally:
        writer.close()


def request_head(
    method: str, path: str, *, length: int | None = None, headers: dict[str, str] | None = None
) -> bytes:
    """Return a request line and headers (Host: 127.0.0.1), ready for a body."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def ndjson_head(running: RunningApi, tenant: str | None, length: int) -> bytes:
    """Return the head of an NDJSON submission of `length` bytes as `tenant`."""
    headers = {"Content-Type": NDJSON}
    if tenant is not None:
        headers["Authorization"] = f"Bearer {running.tokens[tenant]}"
    return request_head("POST", "/v1/batches?task=echo", length=length, headers=headers)


def api_state(running: RunningApi) -> Any:
    """Return the server's ApiState (for test signals only)."""
    return running.uvicorn.config.app.state.pgbatch


# -- 5. one tenant must not exhaust the pool ------------------------------------------------------


@pytest.mark.asyncio
async def test_slow_uploads_hold_no_pooled_connection(start_api: StartApi) -> None:
    lines = [b'{"n": %d}\n' % n for n in range(40)]
    body = b"".join(lines)
    async with (
        start_api(
            tenants=("acme", "globex"), worker=False, api_max_uploads_per_tenant=16
        ) as running,
        running.client("globex", timeout=ANSWER_TIMEOUT_S) as globex,
        contextlib.AsyncExitStack() as stack,
    ):
        # 8 uploads (pool of 6) that started and keep trickling: the old server held a
        # pooled connection per upload, and every other request waited 30 s for a 500.
        uploads = [await stack.enter_async_context(raw(running)) for _ in range(8)]
        for upload in uploads:
            await upload.send(ndjson_head(running, "acme", len(body)) + lines[0])
        await wait_until(lambda: api_state(running).uploads.active("acme") == 8, ANSWER_TIMEOUT_S)
        for line in lines[1:20]:
            for upload in uploads:
                await upload.send(line)
        # Meanwhile another tenant is served at once, over and over.
        for _ in range(5):
            assert (await globex.get("/v1/batches")).status_code == 200
            created = await globex.post("/v1/batches", json={"task": "echo", "items": [1]})
            assert created.status_code == 201, created.text
        for upload in uploads:
            await upload.send(b"".join(lines[20:]))
        for upload in uploads:
            status, _, answer = await upload.response()
            assert status == 201, answer


@pytest.mark.asyncio
async def test_concurrent_uploads_are_capped_per_tenant(start_api: StartApi) -> None:
    async with (
        start_api(
            tenants=("acme", "globex"), worker=False, api_max_uploads_per_tenant=2
        ) as running,
        running.client("acme", timeout=ANSWER_TIMEOUT_S) as acme,
        running.client("globex", timeout=ANSWER_TIMEOUT_S) as globex,
        raw(running) as first,
        raw(running) as second,
    ):
        for upload in (first, second):
            await upload.send(ndjson_head(running, "acme", 4) + b"1\n")
        await wait_until(lambda: api_state(running).uploads.active("acme") == 2, ANSWER_TIMEOUT_S)
        ndjson = {"content": b"1\n2\n", "headers": {"Content-Type": NDJSON}}
        refused = await acme.post("/v1/batches?task=echo", **ndjson)
        assert_error(refused, 429, code="too_many_uploads")
        assert int(refused.headers["retry-after"]) >= 1
        # The cap is per tenant: another tenant uploads as usual.
        assert (await globex.post("/v1/batches?task=echo", **ndjson)).status_code == 201
        for upload in (first, second):
            await upload.send(b"2\n")
            assert (await upload.response())[0] == 201
        # Slots are given back when an upload ends.
        assert (await acme.post("/v1/batches?task=echo", **ndjson)).status_code == 201


@pytest.mark.asyncio
async def test_an_overlong_upload_line_is_refused_before_the_body_ends(
    start_api: StartApi,
) -> None:
    async with start_api(worker=False, api_max_item_bytes=64) as running:
        async with raw(running) as upload:
            # The body goes on (a million bytes declared), but its first line is too long
            # already: the answer comes now, not once the spool holds the whole body.
            await upload.send(ndjson_head(running, None, 1_000_000) + b'"' + b"z" * 200)
            status, _, body = await upload.response()
            assert status == 413, body
            assert b'"item_too_large"' in body and b"64" in body


@pytest.mark.asyncio
async def test_a_stalled_body_is_answered_408(start_api: StartApi) -> None:
    async with start_api(worker=False, api_body_idle_timeout_s=0.5) as running:
        heads = [
            ndjson_head(running, None, 100) + b"1\n",
            request_head(
                "PATCH",
                "/v1/batches/1",
                length=100,
                headers={"Content-Type": "application/json", "If-Match": "*"},
            )
            + b'{"prio',
            request_head(
                "POST", "/v1/documents", length=100, headers={"Content-Type": "application/json"}
            )
            + b"{",
        ]
        for head in heads:
            async with raw(running) as stalled:
                await stalled.send(head)
                status, headers, body = await stalled.response()
                assert status == 408, body
                assert b'"body_timeout"' in body
                assert headers.get("connection") == "close"
                assert await stalled.closed_by_server()


@pytest.mark.asyncio
async def test_a_stalled_request_head_is_closed(start_api: StartApi) -> None:
    async with start_api(worker=False, api_header_timeout_s=0.5) as running:
        async with raw(running) as stalled:
            await stalled.send(b"GET /v1/batches HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            assert await stalled.closed_by_server()
        # The timer starts again for the next request of a kept-alive connection.
        async with raw(running) as stalled:
            await stalled.send(request_head("GET", "/healthz"))
            assert (await stalled.response())[0] == 200
            await stalled.send(b"GET /healthz HTTP/1.1\r\n")
            assert await stalled.closed_by_server()


@contextlib.asynccontextmanager
async def all_connections_taken(running: RunningApi) -> AsyncIterator[None]:
    """Hold every connection of the API's pool (what 6 stuck requests did)."""
    pool = running.app.db.pool
    taken = [await pool.getconn() for _ in range(pool.max_size)]
    try:
        yield
    finally:
        for conn in taken:
            await pool.putconn(conn)


@pytest.mark.asyncio
async def test_a_busy_pool_is_503_promptly_and_keeps_the_connection(start_api: StartApi) -> None:
    async with start_api(worker=False, api_pool_timeout_s=0.5) as running:
        async with raw(running) as client:
            async with all_connections_taken(running):
                for method, path in (("GET", "/v1/batches"), ("GET", "/v1/batches/1")):
                    await client.send(request_head(method, path))
                    status, headers, body = await client.response()
                    assert status == 503, body
                    assert b'"database_busy"' in body
                    assert int(headers["retry-after"]) >= 1
                    assert headers.get("connection") != "close"
            # The same keep-alive connection serves the next request.
            await client.send(request_head("GET", "/v1/batches"))
            assert (await client.response())[0] == 200


async def _admin(running: RunningApi) -> psycopg.AsyncConnection[Any]:
    # From another database: PostgreSQL cannot disallow connections to the current one.
    url = make_conninfo(running.app.db.url, dbname="postgres")
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


@pytest.mark.asyncio
async def test_a_lost_database_is_503_and_the_api_recovers_quickly(start_api: StartApi) -> None:
    async with (
        start_api(worker=False, api_pool_timeout_s=1.0) as running,
        running.client(timeout=ANSWER_TIMEOUT_S) as client,
        await _admin(running) as admin,
    ):
        assert (await client.get("/v1/batches")).status_code == 200
        name = conninfo_to_dict(running.app.db.url)["dbname"]
        terminate = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s"
        # Connections the server dropped while idle in the pool are found at checkout and
        # replaced: the next request is served (it drew a dead connection, and got a 500).
        await admin.execute(terminate, [name])
        assert (await client.get("/v1/batches")).status_code == 200
        # What a restart looks like to the pool: every connection dropped, and no new one
        # for a while, longer than the default backoff's first steps (about 1 + 2 s).
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(terminate, [name])
            for _ in range(4):
                down = await client.get("/v1/batches")
                error = assert_error(down, 503)
                assert error["code"] in ("database_unavailable", "database_busy"), error
                assert int(down.headers["retry-after"]) >= 1
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')

        async def served() -> bool:
            return (await client.get("/v1/batches")).status_code == 200

        # The old pool's next attempt came after its 1, 2, 4 s backoff: 6.3 s at the
        # earliest, beyond this deadline; the capped backoff tries every 0.5 s.
        await wait_until(served, 1.5, interval_s=0.1, message="the API did not recover")


@pytest.mark.asyncio
async def test_a_write_behind_a_frozen_session_is_503_not_a_hang(start_api: StartApi) -> None:
    # Issue 9 item 2: PATCH hung > 8 s behind a session frozen inside its transaction
    # (it held the batch row). lock_timeout ends the wait; the client gets a retryable 503.
    async with (
        start_api(worker=False) as running,
        running.client(timeout=ANSWER_TIMEOUT_S) as client,
    ):
        created = await client.post("/v1/batches", json={"task": "echo", "items": [1, 2]})
        batch_id, etag = created.json()["id"], created.headers["etag"]
        async with await psycopg.AsyncConnection.connect(running.app.db.url) as frozen:
            await frozen.execute(
                "SELECT 1 FROM pgbatch.batches WHERE id = %s FOR NO KEY UPDATE", [batch_id]
            )
            patched = await client.patch(
                f"/v1/batches/{batch_id}", json={"priority": 5}, headers={"If-Match": etag}
            )
            error = assert_error(patched, 503)
            assert error["code"] == "database_busy", error
            assert int(patched.headers["retry-after"]) >= 1
            await frozen.rollback()
        unchanged = (await client.get(f"/v1/batches/{batch_id}")).json()
        assert unchanged["priority"] == 0 and f'"{unchanged["version"]}"' == etag
        again = await client.patch(
            f"/v1/batches/{batch_id}", json={"priority": 5}, headers={"If-Match": etag}
        )
        assert again.status_code == 200, again.text


# -- 6. DNS rebinding -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_without_tokens_only_loopback_hosts_and_origins_are_served(
    start_api: StartApi,
) -> None:
    async with start_api(worker=False) as running, running.client() as client:
        port = urlsplit(running.base_url).port
        for host in ("attacker.example", f"attacker.example:{port}", "127.0.0.1.nip.io", ""):
            response = await client.get("/v1/batches", headers={"Host": host})
            assert_error(response, 421, code="misdirected_request", field="Host")
            submit = await client.post(
                "/v1/batches", json={"task": "echo", "items": [1]}, headers={"Host": host}
            )
            assert_error(submit, 421)
        for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert (await client.get("/v1/batches", headers={"Host": host})).status_code == 200
        batch = {"task": "echo", "items": [1]}
        for origin in ("http://attacker.example", f"http://attacker.example:{port}", "null"):
            refused = await client.post("/v1/batches", json=batch, headers={"Origin": origin})
            assert_error(refused, 403, code="forbidden_origin", field="Origin")
            # Reads are the same-origin policy's business; a write is refused whatever it is.
            assert (await client.get("/v1/batches", headers={"Origin": origin})).status_code == 200
        for origin in (f"http://localhost:{port}", f"http://127.0.0.1:{port}"):
            accepted = await client.post("/v1/batches", json=batch, headers={"Origin": origin})
            assert accepted.status_code == 201, accepted.text


@pytest.mark.asyncio
async def test_with_tokens_any_host_name_is_served(start_api: StartApi) -> None:
    async with start_api(tenants=("acme",), worker=False) as running, running.client("acme") as c:
        response = await c.get("/v1/batches", headers={"Host": "pgbatch.example.com"})
        assert response.status_code == 200, response.text


# -- 7. one body limit on every route -----------------------------------------------------------


@pytest.mark.asyncio
async def test_every_route_bounds_its_body_before_parsing(start_api: StartApi) -> None:
    limit = 64 * 1024
    big = b'{"x": "' + b"a" * (limit + 10) + b'"}'
    async with (
        start_api(
            worker=False, api_max_json_bytes=limit, api_max_upload_bytes=2 * limit
        ) as running,
        running.client(timeout=ANSWER_TIMEOUT_S) as client,
    ):
        json_type = {"Content-Type": "application/json"}
        targets = [
            ("POST", "/v1/batches", json_type),
            ("POST", "/v1/documents", json_type),
            ("PATCH", "/v1/batches/1", {**json_type, "If-Match": "*"}),
            ("POST", "/v1/collections/src/copy", json_type),
            ("POST", "/v1/batches/1/retry", json_type),
        ]
        for method, path, headers in targets:
            declared = await client.request(method, path, content=big, headers=headers)
            error = assert_error(declared, 413, code="body_too_large", field="body")
            assert str(limit) in error["message"], error

            async def chunks() -> AsyncIterator[bytes]:
                # No Content-Length (chunked): the bytes themselves are counted.
                for start in range(0, len(big), 8192):
                    yield big[start : start + 8192]

            streamed = await client.request(method, path, content=chunks(), headers=headers)
            assert_error(streamed, 413, code="body_too_large", field="body")
        # An NDJSON upload is bounded by its own, larger limit, also while it streams.
        lines = b"1\n" * limit
        ndjson = {"Content-Type": NDJSON}
        ok = await client.post("/v1/batches?task=echo", content=lines, headers=ndjson)
        assert ok.status_code == 201, ok.text
        too_big = await client.post("/v1/batches?task=echo", content=lines * 3, headers=ndjson)
        error = assert_error(too_big, 413, code="body_too_large", field="body")
        assert str(2 * limit) in error["message"], error

        async def lines_in_chunks() -> AsyncIterator[bytes]:
            for _ in range(3):
                yield lines

        streamed = await client.post(
            "/v1/batches?task=echo", content=lines_in_chunks(), headers=ndjson
        )
        assert_error(streamed, 413, code="body_too_large", field="body")


# -- 8. /metrics -----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_metrics_need_their_own_token_when_one_is_set(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme",), worker=False, metrics_token="scrape-me") as running,
        running.client() as anonymous,
        running.client("acme") as acme,
    ):
        for client in (anonymous, acme):
            assert_error(await client.get("/metrics"), 401, field="Authorization")
        wrong = await anonymous.get("/metrics", headers={"Authorization": "Bearer scrape-you"})
        assert_error(wrong, 401, field="Authorization")
        good = await anonymous.get("/metrics", headers={"Authorization": "Bearer scrape-me"})
        assert good.status_code == 200, good.text
        assert "pgbatch_batches" in good.text


def _gauge(text: str, series: str) -> float:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[1])
    return 0.0


@pytest.mark.asyncio
async def test_a_scrape_is_cached_and_computed_once_at_a_time(start_api: StartApi) -> None:
    async with (
        start_api(worker=False, metrics_cache_s=60) as running,
        running.client(timeout=ANSWER_TIMEOUT_S) as client,
    ):
        pending = 'pgbatch_batches{status="pending"}'
        before = await client.get("/metrics")
        assert before.status_code == 200
        created = await client.post("/v1/batches", json={"task": "echo", "items": [1]})
        assert created.status_code == 201
        # Within the cache period a scrape is the cached one: the database is not asked.
        assert _gauge((await client.get("/metrics")).text, pending) == _gauge(before.text, pending)
        metrics = api_state(running).metrics
        computed, asked = metrics.computations, metrics.scrapes
        metrics.expire()
        # The computation waits for a connection until all 16 scrapes arrived, so they
        # truly overlap; then it may go on.
        async with all_connections_taken(running):
            scraping = [asyncio.create_task(client.get("/metrics")) for _ in range(16)]
            await wait_until(lambda: metrics.scrapes == asked + 16, ANSWER_TIMEOUT_S)
        scrapes = await asyncio.gather(*scraping)
        assert all(s.status_code == 200 for s in scrapes)
        # 16 concurrent scrapers, one computation.
        assert metrics.computations == computed + 1
        assert _gauge(scrapes[0].text, pending) == _gauge(before.text, pending) + 1


# -- 11. a client that leaves mid-body -----------------------------------------------------------


@pytest.mark.asyncio
async def test_a_client_gone_mid_body_is_499_without_a_traceback(
    start_api: StartApi, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with (
        start_api(worker=False, metrics_cache_s=0) as running,
        running.client(timeout=ANSWER_TIMEOUT_S) as client,
    ):
        heads = [
            ndjson_head(running, None, 1000) + b"1\n2\n",
            request_head(
                "PATCH",
                "/v1/batches/1",
                length=1000,
                headers={"Content-Type": "application/json", "If-Match": "*"},
            )
            + b"{",
        ]
        for head in heads:
            async with raw(running) as leaving:
                await leaving.send(head)
                await asyncio.sleep(0)  # let the server start reading the body

        def series(status: str) -> list[str]:
            return [
                line
                for line in metrics_text
                if line.startswith("pgbatch_http_request_duration_seconds_count")
                and f'status="{status}"' in line
            ]

        metrics_text: list[str] = []

        async def both_counted() -> bool:
            metrics_text[:] = (await client.get("/metrics")).text.splitlines()
            return sum(float(line.split()[1]) for line in series("499")) >= 2

        await wait_until(both_counted, ANSWER_TIMEOUT_S, message=lambda: "\n".join(metrics_text))
        assert series("500") == []
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR
    ]


@pytest.mark.asyncio
async def test_an_error_answer_keeps_the_connection_alive(
    api: RunningApi, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    # A bug of ours: answered 500 once, logged once, and the connection stays usable.
    monkeypatch.setattr(api.app, "list_batches", broken)
    async with raw(api) as client:
        for path in ("/v1/batches/999", "/nope", "/v1/batches?limit=x", "/v1/batches"):
            await client.send(request_head("GET", path))
            status, headers, body = await client.response()
            assert status in (404, 422, 500), body
            assert headers.get("connection") != "close"
        assert b'"internal_error"' in body
        await client.send(request_head("GET", "/healthz"))
        assert (await client.response())[0] == 200
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]


def test_metrics_answer_only_loopback_peers_without_a_token() -> None:
    state = SimpleNamespace(settings=Settings(metrics_token=None))
    for peer, allowed in (("127.0.0.1", True), ("::1", True), ("10.0.0.5", False)):
        request = Request({"type": "http", "headers": [], "client": (peer, 4321)})
        if allowed:
            system._check_scraper(request, state)  # type: ignore[arg-type]
        else:
            with pytest.raises(ApiError) as refused:
                system._check_scraper(request, state)  # type: ignore[arg-type]
            assert refused.value.status == 403
