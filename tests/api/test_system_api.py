"""Health, Prometheus metrics, and the one error shape: a client's mistake is never a 500."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgbatch.api.server import server as api_server
from tests.api.conftest import RunningApi, StartApi
from tests.api.support import assert_error
from tests.apps.api_app import build_app
from tests.conftest import settings_for
from tests.helpers import wait_until

# -- health ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_healthz_says_the_database_answers_and_migrations_are_current(
    api: RunningApi,
) -> None:
    async with api.client() as client:
        response = await client.get("/healthz")
        assert response.status_code == 200
        assert response.json() == {"status": "ok", "database": "ok", "migrations": "current"}
        # A migration the database lacks makes the process unhealthy.
        async with api.app.db.connection() as conn:
            await conn.execute(
                "DELETE FROM pgbatch.schema_migrations"
                " WHERE version = (SELECT max(version) FROM pgbatch.schema_migrations)"
            )
        behind = await client.get("/healthz")
        assert behind.status_code == 503
        assert behind.json()["status"] == "unavailable"
        assert "pending" in behind.json()["migrations"]


class TcpProxy:
    """A loopback TCP proxy to the test's PostgreSQL, which the test can cut and restore."""

    def __init__(self, database_url: str) -> None:
        params = conninfo_to_dict(database_url)
        host, port = str(params.get("host") or "localhost"), int(params.get("port") or 5432)
        self.target = host, port
        self.database_url = database_url
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """Return the database URL through this proxy."""
        return make_conninfo(self.database_url, host="127.0.0.1", port=str(self.port))

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        host, port = self.target
        if host.startswith("/"):
            return await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        return await asyncio.open_connection(host, port)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await self._connect()
        self._writers |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def start(self) -> None:
        """Accept connections (on the same port after a cut)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Refuse new connections and drop the open ones: the database is gone."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()


@contextlib.asynccontextmanager
async def proxied(database_url: str) -> AsyncIterator[TcpProxy]:
    """Run a proxy to the database for the duration of the block."""
    proxy = TcpProxy(database_url)
    await proxy.start()
    try:
        yield proxy
    finally:
        with contextlib.suppress(AssertionError, OSError):
            await proxy.cut()


@contextlib.asynccontextmanager
async def api_through(proxy: TcpProxy) -> AsyncIterator[httpx.AsyncClient]:
    """Serve an API whose App reaches the database through `proxy`; return a client of it."""
    app, _ = build_app(settings_for(proxy.url))
    http = api_server(app, host="127.0.0.1", port=0, log_level="critical")
    serving = asyncio.create_task(http.serve())
    try:
        await wait_until(lambda: http.started or serving.done(), 30)
        if serving.done():
            serving.result()  # raises why it could not start
        port = http.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        http.should_exit = True
        await serving
        await app.close()


@pytest.mark.asyncio
async def test_healthz_answers_503_while_the_database_is_unreachable(database_url: str) -> None:
    async with proxied(database_url) as proxy, api_through(proxy) as client:
        assert (await client.get("/healthz")).status_code == 200
        await proxy.cut()
        down = await client.get("/healthz")
        assert down.status_code == 503, down.text
        assert down.json()["status"] == "unavailable"
        assert down.json()["database"].startswith("unreachable")
        await proxy.start()

        async def healthy() -> bool:
            return (await client.get("/healthz")).status_code == 200

        await wait_until(healthy, 30, message="the API never saw the database come back")


# -- metrics --------------------------------------------------------------------------------


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse Prometheus text into {(sample name, sorted labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.asyncio
async def test_metrics_show_shards_items_takeovers_and_latency_by_route(
    start_api: StartApi,
) -> None:
    async with start_api(worker=False) as running, running.client() as client:
        ok = await client.post("/v1/batches", json={"task": "echo", "items": list(range(25))})
        bad = await client.post(
            "/v1/batches", json={"task": "flaky", "items": ["fail", "x", "raise"], "shard_size": 2}
        )
        ok_id, bad_id = ok.json()["id"], bad.json()["id"]
        before = _samples((await client.get("/metrics")).text)
        assert before[("pgbatch_shards", (("state", "queued"),))] == 5
        assert before[("pgbatch_lease_takeovers", ())] == 0
        assert before[("pgbatch_lease_refunds", ())] == 0
        # A worker that died holding a shard: its lease has expired; the rescuer takes over.
        async with running.app.db.connection() as conn:
            await conn.execute(
                "UPDATE pgbatch.shards SET status = 'running', lease_epoch = lease_epoch + 1,"
                " attempts = attempts + 1, worker_id = 'crashed',"
                " lease_expires_at = now() - interval '1 second'"
                " WHERE batch_id = %s AND shard_no = 0",
                (ok_id,),
            )
        worker = running.app.worker(concurrency=4)
        working = asyncio.create_task(worker.run())
        try:
            await running.app.wait(ok_id, timeout_s=30)
            await running.app.wait(bad_id, timeout_s=30)
        finally:
            worker.request_stop()
            await working
        for path in ("/v1/batches/123456", "/v1/batches/654321", f"/v1/batches/{ok_id}"):
            await client.get(path)
        await client.get("/no/such/path/42")
        await client.get("/openapi.json")
        for invented in ("FOO1", "FOO2", "QUERY"):
            assert_error(await client.request(invented, "/v1/batches"), 405)
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = _samples(response.text)
    # echo: 3 shards of 10; flaky: 2 shards of 2, the second one dead.
    assert after[("pgbatch_shards", (("state", "done"),))] == 4
    assert after[("pgbatch_shards", (("state", "dead"),))] == 1
    assert after[("pgbatch_shards", (("state", "queued"),))] == 0
    assert after[("pgbatch_shards", (("state", "running"),))] == 0
    assert after[("pgbatch_items_finished", (("outcome", "ok"),))] == 26
    assert after[("pgbatch_items_finished", (("outcome", "failed"),))] == 2
    assert after[("pgbatch_lease_takeovers", ())] == 1
    assert after[("pgbatch_lease_refunds", ())] == 1  # a lapsed lease is not the handler's
    assert after[("pgbatch_batches", (("status", "succeeded"),))] == 1
    assert after[("pgbatch_batches", (("status", "failed"),))] == 1
    routes = {
        dict(labels)["route"]
        for (name, labels) in after
        if name == "pgbatch_http_request_duration_seconds_count"
    }
    # Labelled by route template, never by raw path (bounded cardinality).
    assert "/v1/batches/{batch_id}" in routes
    assert "/v1/batches" in routes
    assert "unmatched" in routes
    assert "/openapi.json" in routes  # a route without parameters is labelled by its path
    assert not any("123456" in r or "654321" in r or "/no/such" in r for r in routes), routes
    methods = {
        dict(labels)["method"]
        for (name, labels) in after
        if name == "pgbatch_http_request_duration_seconds_count"
    }
    # Invented methods share one label value: they cannot grow the series without bound.
    assert methods == {"GET", "POST", "other"}, methods
    count = after[
        (
            "pgbatch_http_request_duration_seconds_count",
            (("method", "GET"), ("route", "/v1/batches/{batch_id}"), ("status", "404")),
        )
    ]
    assert count == 2
    assert any(
        name == "pgbatch_http_request_duration_seconds_bucket" and dict(labels)["le"] == "+Inf"
        for name, labels in after
    )


# -- errors ---------------------------------------------------------------------------------

# (method, path, headers, body, expected status): a client's mistakes, each with the status
# it deserves. None of them may be a 500, and every one answers in the one error shape.
CLIENT_MISTAKES: list[tuple[str, str, dict[str, Any], bytes | None, int]] = [
    ("GET", "/v1/batches/99999999999999999999999999", {}, None, 404),
    ("GET", "/v1/batches/9223372036854775808", {}, None, 404),
    ("GET", "/v1/batches/-5", {}, None, 404),
    ("GET", "/v1/batches/0", {}, None, 404),
    ("GET", "/v1/batches/abc", {}, None, 422),
    ("GET", "/v1/batches/1.5", {}, None, 422),
    ("GET", "/v1/batches/%00", {}, None, 422),
    # Integers in digits only, as documented: not " 1", "1_0", "+1" or "1.0".
    ("GET", "/v1/batches/%20{id}", {}, None, 422),
    ("GET", "/v1/batches/{id}%20", {}, None, 422),
    ("GET", "/v1/batches/+{id}", {}, None, 422),
    ("GET", "/v1/batches/{id}.0", {}, None, 422),
    ("GET", "/v1/batches/{id}_0", {}, None, 422),
    ("GET", "/v1/batches/%20{id}/events", {}, None, 422),
    ("POST", "/v1/batches/%20{id}/retry", {"If-Match": "null"}, None, 422),
    ("GET", "/v1/batches?limit=%205", {}, None, 422),
    ("GET", "/v1/batches?limit=5.0", {}, None, 422),
    ("POST", "/v1/batches?task=echo&shard_size=1_0", {"Content-Type": "application/x-ndjson"},
     b"1\n", 422),
    ("POST", "/v1/batches?task=echo&lease_ttl_s=%201.5", {"Content-Type": "application/x-ndjson"},
     b"1\n", 422),
    ("GET", "/v1/batches/-1/insight", {}, None, 404),
    ("GET", "/v1/batches/99999999999999999999999/results", {}, None, 404),
    ("GET", "/v1/batches/99999999999999999999999/events", {}, None, 404),
    ("GET", "/v1/batches/-1/events", {}, None, 404),
    ("POST", "/v1/batches/99999999999999999999999/retry", {}, None, 404),
    ("PATCH", "/v1/batches/-1", {"If-Match": "*"}, b'{"priority": 1}', 404),
    ("GET", "/v1/batches?task=%00", {}, None, 422),
    ("GET", "/v1/batches?limit=-1", {}, None, 422),
    ("GET", "/v1/batches?limit=1e9", {}, None, 422),
    ("GET", "/v1/batches?status=%FF", {}, None, 422),
    ("GET", "/v1/batches?cursor=%C2%B2", {}, None, 422),
    ("GET", "/v1/batches?cursor=-3", {}, None, 422),
    ("GET", "/v1/batches?created_after=not-a-date", {}, None, 422),
    ("POST", "/v1/batches", {}, b'{"task": "echo", "items": [1], "queue": "a\\u0000b"}', 422),
    ("POST", "/v1/batches?task=echo&queue=a%00b", {"Content-Type": "application/x-ndjson"},
     b"1\n", 422),
    ("POST", "/v1/batches?task=%00", {"Content-Type": "application/x-ndjson"}, b"1\n", 422),
    ("POST", "/v1/batches", {}, b'{"task": "echo", "items": [1], "on_complete": "\\u0000"}',
     422),
    ("POST", "/v1/batches", {}, b"\xff\xfe\xfd", 422),
    ("POST", "/v1/batches", {}, b'{"task": "echo", "items": [' + b"[" * 5000 + b"]" * 5000 + b"]}",
     422),
    ("POST", "/v1/batches", {"Content-Type": ";;;"}, b"{}", 422),
    ("POST", "/v1/batches", {"Content-Type": "application/json", "Idempotency-Key": "k" * 201},
     b'{"task": "echo", "items": [1]}', 422),
    ("POST", "/v1/batches", {"Content-Type": "application/json", "Idempotency-Key": ""},
     b'{"task": "echo", "items": [1]}', 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "*"}, b"garbage", 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "*"}, b"\xff\xfe", 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "*"}, b"[]", 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "*"}, b"null", 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "*"}, b'{"priority": 1.5}', 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "*"}, b'{"priority": null, "status": 3}', 422),
    ("PATCH", "/v1/batches/{id}", {"If-Match": b'"\xb2"'}, b'{"priority": 1}', 412),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "1" * 40}, b'{"priority": 1}', 412),
    ("PATCH", "/v1/batches/{id}", {"If-Match": "x" * 101}, b'{"priority": 1}', 422),
    ("POST", "/v1/batches/{id}/retry", {"If-Match": b"\xb2"}, None, 412),
    ("POST", "/v1/batches/{id}/retry", {"If-Match": "99999999999999999999999"}, None, 412),
    ("GET", "/v1/batches/{id}/results?status=maybe", {}, None, 422),
    ("GET", "/v1/batches/{id}/events", {"Last-Event-ID": "x" * 101}, None, 422),
    ("DELETE", "/v1/batches/{id}", {}, None, 405),
    ("PUT", "/v1/batches", {}, b"{}", 405),
    ("GET", "/v1/nothing-here", {}, None, 404),
]  # fmt: skip


@pytest.mark.asyncio
async def test_client_mistakes_are_never_server_errors(api: RunningApi) -> None:
    async with api.client() as client:
        created = await client.post("/v1/batches", json={"task": "echo", "items": [1]})
        batch_id = created.json()["id"]
        await api.app.wait(batch_id, timeout_s=30)
        before = (await client.get(f"/v1/batches/{batch_id}")).json()
        for method, path, headers, body, status in CLIENT_MISTAKES:
            headers = {"Content-Type": "application/json", **headers} if body else headers
            response = await client.request(
                method, path.replace("{id}", str(batch_id)), headers=headers, content=body
            )
            assert response.status_code == status, (method, path, headers, response.text)
            assert_error(response, status)
        # Nothing above wrote anything: the one batch is as it was.
        assert (await client.get("/v1/batches")).json()["batches"] == [before]


@pytest.mark.asyncio
async def test_bodies_that_are_not_json_name_the_body(api: RunningApi) -> None:
    async with api.client() as client:
        batch_id = (await client.post("/v1/batches", json={"task": "echo", "items": []})).json()[
            "id"
        ]
        for body in (b"garbage", b"\xff\xfe", b'{"priority": 1', b"", b"[]", b"null", b"7"):
            for method, path, headers in (
                ("POST", "/v1/batches", {}),
                ("PATCH", f"/v1/batches/{batch_id}", {"If-Match": "*"}),
            ):
                if method == "PATCH" and body == b"":
                    continue  # no body at all is "nothing to change", tested elsewhere
                response = await client.request(
                    method,
                    path,
                    content=body,
                    headers={"Content-Type": "application/json", **headers},
                )
                assert_error(response, 422, field="body")
