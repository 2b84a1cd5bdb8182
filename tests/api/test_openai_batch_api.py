"""Issue 10, point 2: the OpenAI Batch API under /openai/v1, driven by the real `openai`
client (sync and async) and by raw HTTP for what a client library would never send.

A real API server and worker (tests/api/conftest.py) on the test's database, and the
fake OpenAI-compatible upstream over real HTTP, which counts every request it receives.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai
import orjson
import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgbatch.workloads.llm import batches
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from tests.api.conftest import RunningApi, StartApi

ENDPOINT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
# How long a test waits for a batch to end: far beyond what a few hundred requests to a
# local fake take, so only a hang trips it.
BATCH_DEADLINE_S = 120


def request_line(custom_id: str, prompt: str = "hello", *, url: str = ENDPOINT) -> bytes:
    """Return one request line of an OpenAI batch file."""
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def request_file(lines: list[bytes]) -> bytes:
    """Return a request file: the lines, each ending in a newline."""
    return b"".join(line + b"\n" for line in lines)


@pytest_asyncio.fixture
async def upstream(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeUpstream]:
    """Serve the fake upstream and point the worker's LLM client at it."""
    fake = FakeUpstream()
    async with serving(fake) as base_url:
        monkeypatch.setenv("PGBATCH_LLM_BASE_URL", base_url)
        yield fake
        await batches.upstream_client_close()


def _poll(client: openai.OpenAI, batch_id: str, done: Callable[[Any], bool]) -> Any:
    deadline = time.monotonic() + BATCH_DEADLINE_S
    while True:
        batch = client.batches.retrieve(batch_id)
        if done(batch):
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} stuck in {batch.status}"
        time.sleep(0.1)


def _custom_ids(content: bytes) -> list[str]:
    return [orjson.loads(line)["custom_id"] for line in content.splitlines() if line.strip()]


def _openai_round_trip(base_url: str, token: str, fake: FakeUpstream) -> None:
    """What a user runs against OpenAI, pointed at our server (a blocking client)."""
    client = openai.OpenAI(base_url=f"{base_url}/openai/v1", api_key=token, max_retries=0)
    ids = [f"req-{i}" for i in range(120)]
    data = request_file([request_line(i) for i in ids] + [request_line("bad", "x [fake:400]")])
    uploaded = client.files.create(file=("requests.jsonl", data), purpose="batch")
    assert uploaded.object == "file" and uploaded.id.startswith("file-")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        len(data),
        "requests.jsonl",
        "batch",
    )
    assert client.files.retrieve(uploaded.id).bytes == len(data)
    assert client.files.content(uploaded.id).content == data
    assert uploaded.id in [f.id for f in client.files.list()]

    batch = client.batches.create(
        input_file_id=uploaded.id,
        endpoint=ENDPOINT,
        completion_window="24h",
        metadata={"run": "first"},
    )
    assert batch.status in ("validating", "in_progress", "completed"), batch
    assert batch.metadata == {"run": "first"} and batch.input_file_id == uploaded.id
    done = _poll(client, batch.id, lambda b: b.status in TERMINAL)
    assert done.status == "completed", done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (121, 120, 1)
    assert done.completed_at is not None and done.in_progress_at is not None
    assert done.output_file_id and done.error_file_id
    output = client.files.content(done.output_file_id).content
    errors = client.files.content(done.error_file_id).content
    seen = Counter(_custom_ids(output) + _custom_ids(errors))
    assert seen == Counter([*ids, "bad"]), "every custom_id exactly once across the files"
    assert _custom_ids(errors) == ["bad"]
    bad = orjson.loads(errors)
    assert bad["response"]["status_code"] == 400
    out_file = client.files.retrieve(done.output_file_id)
    assert (out_file.bytes, out_file.purpose) == (len(output), "batch_output")
    # Each request reached the upstream once.
    assert len(fake.served) == 121

    # A second, slow batch is cancelled while it runs.
    fake.set_limits(latency_ms=1000)
    slow_ids = [f"slow-{i}" for i in range(2000)]
    slow_file = client.files.create(
        file=("slow.jsonl", request_file([request_line(i) for i in slow_ids])), purpose="batch"
    )
    slow = client.batches.create(
        input_file_id=slow_file.id, endpoint=ENDPOINT, completion_window="24h"
    )
    cancelling = client.batches.cancel(slow.id)
    assert cancelling.status in ("cancelling", "cancelled"), cancelling
    assert cancelling.cancelling_at is not None
    cancelled = _poll(client, slow.id, lambda b: b.status == "cancelled")
    fake.set_limits(latency_ms=0)
    counts = cancelled.request_counts
    slow_output = (
        client.files.content(cancelled.output_file_id).content if cancelled.output_file_id else b""
    )
    assert cancelled.error_file_id is not None
    slow_errors = client.files.content(cancelled.error_file_id).content
    # Honest counts: what the files hold, the queued requests never sent.
    assert counts.total == 2000
    assert counts.completed == len(_custom_ids(slow_output))
    assert counts.failed == len(_custom_ids(slow_errors))
    assert counts.completed + counts.failed == counts.total
    assert counts.completed < counts.total
    assert Counter(_custom_ids(slow_output) + _custom_ids(slow_errors)) == Counter(slow_ids)
    cancelled_lines = [orjson.loads(line) for line in slow_errors.splitlines()]
    assert {line["error"]["code"] for line in cancelled_lines} == {"batch_cancelled"}
    # Queued requests never went out; those in flight did, and a running shard that is
    # cancelled drops its answers (the engine's cancel), so they count as cancelled.
    sent = len(fake.served) - 121
    assert counts.completed <= sent < counts.total
    # Cancelling again answers the same batch; cancelling a completed one is refused.
    assert client.batches.cancel(slow.id).status == "cancelled"
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)

    # Listing pages through both batches, newest first, one per page.
    page = client.batches.list(limit=1)
    assert [b.id for b in page.data] == [slow.id] and page.has_more
    assert [b.id for b in client.batches.list(limit=1)] == [slow.id, batch.id]


@pytest.mark.asyncio
async def test_the_openai_client_uploads_runs_reads_and_cancels_batches(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    async with start_api(tenants=("acme",)) as api:
        await asyncio.to_thread(_openai_round_trip, api.base_url, api.tokens["acme"], upstream)


@pytest.mark.asyncio
async def test_the_async_openai_client_runs_a_batch(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    async with start_api(tenants=("acme",)) as api:
        client = openai.AsyncOpenAI(
            base_url=f"{api.base_url}/openai/v1", api_key=api.tokens["acme"], max_retries=0
        )
        ids = [f"a-{i}" for i in range(30)]
        uploaded = await client.files.create(
            file=("a.jsonl", request_file([request_line(i) for i in ids])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        deadline = time.monotonic() + BATCH_DEADLINE_S
        while batch.status not in TERMINAL:
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.05)
            batch = await client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.error_file_id is None
        assert batch.output_file_id is not None
        output = await client.files.content(batch.output_file_id)
        assert _custom_ids(output.content) == ids
        deleted = await client.files.delete(uploaded.id)
        assert deleted.deleted
        # The batch lives on without its input file (its requests were submitted).
        assert (await client.batches.retrieve(batch.id)).status == "completed"
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(uploaded.id)
        await client.close()


def _errors_of(batch: dict[str, Any]) -> list[tuple[int | None, str, str | None]]:
    return [(e["line"], e["code"], e["param"]) for e in batch["errors"]["data"]]


async def _upload(http: httpx.AsyncClient, data: bytes, name: str = "r.jsonl") -> str:
    answer = await http.post(
        "/openai/v1/files", files={"file": (name, data)}, data={"purpose": "batch"}
    )
    assert answer.status_code == 200, answer.text
    file_id: str = answer.json()["id"]
    return file_id


async def _create(http: httpx.AsyncClient, file_id: str, **body: Any) -> httpx.Response:
    payload = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h", **body}
    return await http.post("/openai/v1/batches", json=payload)


async def _run_batches(api: RunningApi) -> int:
    async with api.app.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pgbatch.batches")
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


BOUNDARY = "pgbatchtestboundary"


def multipart_form(data: bytes, filename: str = "b.jsonl") -> bytes:
    """Return a multipart body: purpose=batch and `data` as the file."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"'
        "\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


async def _streamed_upload(
    http: httpx.AsyncClient, form: bytes, *, chunk_bytes: int = 65536
) -> httpx.Response:
    """POST a multipart body in chunks, without a Content-Length."""

    async def chunks() -> AsyncIterator[bytes]:
        view = memoryview(form)
        for start in range(0, len(form), chunk_bytes):
            yield bytes(view[start : start + chunk_bytes])

    return await http.post(
        "/openai/v1/files",
        content=chunks(),
        headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
    )


def assert_openai_error(
    answer: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """Check an answer is an error in OpenAI's shape; return its `error` member."""
    assert answer.status_code == status, answer.text
    error: dict[str, Any] = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.mark.asyncio
async def test_a_bad_file_fails_validation_with_line_numbers_and_nothing_runs(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    lines = [
        request_line("a"),
        request_line("b"),
        b'{"custom_id": "c", "method": "POST", "url": ',  # 3: not JSON
        request_line("d"),
        request_line("a"),  # 5: a's again
        b"",  # blank lines are skipped, still counted as lines
        request_line("e", url="/v1/embeddings"),  # 7: not the batch's endpoint
        orjson.dumps({"custom_id": "f", "method": "POST", "url": ENDPOINT}),  # 8: no body
        request_line("g\u0000"),  # 9: an id PostgreSQL's text cannot hold
    ]
    async with start_api(tenants=("acme",)) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file(lines))
        answer = await _create(http, file_id)
        assert answer.status_code == 200, answer.text
        batch = answer.json()
        assert batch["status"] == "failed" and batch["failed_at"] is not None
        assert _errors_of(batch) == [
            (3, "invalid_json_line", None),
            (5, "duplicate_custom_id", "custom_id"),
            (7, "mismatched_endpoint", "url"),
            (8, "missing_required_parameter", "body"),
            (9, "invalid_custom_id", "custom_id"),
        ]
        assert batch["output_file_id"] is None and batch["error_file_id"] is None
        assert (await http.get(f"/openai/v1/batches/{batch['id']}")).json() == batch
        # An empty file fails too.
        empty = await _create(http, await _upload(http, b"\n\n"))
        assert _errors_of(empty.json()) == [(None, "empty_file", None)]
        # Nothing was submitted, nothing queued, nothing reached the upstream.
        assert await _run_batches(api) == 0
        assert upstream.served == []


@pytest.mark.asyncio
async def test_a_request_line_past_the_limit_fails_validation_without_being_held(
    start_api: StartApi, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pgbatch.workloads.llm.batch_api import service

    # 201 MB lines are the case; the same path with the limit lowered to 1 KiB.
    monkeypatch.setattr(service, "MAX_REQUEST_BYTES", 1024)
    huge = request_line("big", "x" * 5000)
    async with start_api(tenants=("acme",)) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file([request_line("a"), huge, request_line("c")]))
        batch = (await _create(http, file_id)).json()
        assert batch["status"] == "failed"
        assert _errors_of(batch) == [(2, "request_too_large", None)]
        assert str(len(huge)) in batch["errors"]["data"][0]["message"]
        assert await _run_batches(api) == 0 and upstream.served == []


@pytest.mark.asyncio
async def test_an_oversized_upload_is_413_and_nothing_is_stored(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme",), worker=False, api_max_upload_bytes=4096) as api,
        api.client("acme") as http,
    ):
        big = request_file([request_line(f"r{i}") for i in range(100)])
        assert len(big) > 4096
        declared = await http.post(
            "/openai/v1/files", files={"file": ("big.jsonl", big)}, data={"purpose": "batch"}
        )
        # Refused by the request guard before routing, still in OpenAI's shape.
        assert "PGBATCH_API_MAX_UPLOAD_BYTES" in assert_openai_error(declared, 413)["message"]

        # The same body streamed without a Content-Length: refused as it arrives.
        streamed = await _streamed_upload(http, multipart_form(big), chunk_bytes=1000)
        assert_openai_error(streamed, 413)
        assert (await http.get("/openai/v1/files")).json()["data"] == []
        async with api.app.db.connection() as conn:
            cur = await conn.execute(
                "SELECT (SELECT count(*) FROM pgbatch.llm_files),"
                " (SELECT count(*) FROM pgbatch.llm_file_chunks)"
            )
            assert await cur.fetchone() == (0, 0)
        # A file under the limit is stored.
        await _upload(http, request_file([request_line("small")]))
    # A multipart body to any other route is not an upload: the JSON limit holds there.
    async with (
        start_api(tenants=("acme",), worker=False, api_max_json_bytes=4096) as api,
        api.client("acme") as http,
    ):
        elsewhere = await http.post("/v1/documents", files={"file": ("big.jsonl", big)})
        assert elsewhere.status_code == 413, elsewhere.text
        assert "PGBATCH_API_MAX_JSON_BYTES" in elsewhere.json()["error"]["message"]


@pytest.mark.asyncio
async def test_malformed_uploads_are_400_naming_the_field(start_api: StartApi) -> None:
    async with start_api(tenants=("acme",), worker=False) as api, api.client("acme") as http:
        data = request_file([request_line("a")])
        no_purpose = await http.post("/openai/v1/files", files={"file": ("r.jsonl", data)})
        assert_openai_error(no_purpose, 400, param="purpose", code="missing_required_parameter")
        no_file = await http.post("/openai/v1/files", data={"purpose": "batch"})
        assert_openai_error(no_file, 400, param="file")
        fine_tune = await http.post(
            "/openai/v1/files", files={"file": ("r.jsonl", data)}, data={"purpose": "fine-tune"}
        )
        assert_openai_error(fine_tune, 400, param="purpose", code="invalid_value")
        not_a_form = await http.post("/openai/v1/files", content=b"{}")
        assert_openai_error(not_a_form, 400, param="purpose")
        broken = await http.post(
            "/openai/v1/files",
            content=b"--x\r\nnonsense",
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        assert_openai_error(broken, 400)
        assert (await http.get("/openai/v1/files")).json()["data"] == []

        # A raw client may send a NUL in a part's file name (httpx escapes it).
        nul_name = await _streamed_upload(http, multipart_form(data, filename="a\x00b.jsonl"))
        assert nul_name.json()["filename"] == "ab.jsonl", nul_name.text
        file_id = await _upload(http, data)
        for body, param in (
            ({"endpoint": "/v1/images"}, "endpoint"),
            ({"completion_window": "48h"}, "completion_window"),
            ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
            ({"metadata": {"k": "v" * 513}}, "metadata.k"),
            ({"metadata": {"k": 1}}, "metadata.k"),
            ({"surprise": True}, "surprise"),
            ({"metadata": {"k": "nul \u0000"}}, "metadata"),
        ):
            assert_openai_error(await _create(http, file_id, **body), 400, param=param)
        missing = await http.post("/openai/v1/batches", json={"endpoint": ENDPOINT})
        assert_openai_error(missing, 400, param="input_file_id")
        not_json = await http.post(
            "/openai/v1/batches", content=b"{", headers={"Content-Type": "application/json"}
        )
        assert_openai_error(not_json, 400, param="body")
        assert_openai_error(await _create(http, "file-999999"), 404, param="input_file_id")
        assert_openai_error(await _create(http, "nonsense"), 404, param="input_file_id")
        for path in (
            "/openai/v1/files/file-99999999999999999999",
            "/openai/v1/files/batch_1",
            "/openai/v1/files/file-batch_1-output",
            "/openai/v1/files/file-batch_x-output/content",
            "/openai/v1/batches/batch_0",
            "/openai/v1/batches/file-1",
            "/openai/v1/nowhere",
        ):
            assert_openai_error(await http.get(path), 404)
        assert_openai_error(await http.get("/openai/v1/batches?limit=0"), 400, param="limit")
        assert_openai_error(await http.get("/openai/v1/files?after=zz"), 404, param="after")
        assert await _run_batches(api) == 0


@pytest.mark.asyncio
async def test_a_tenant_cannot_see_or_use_another_tenants_files_and_batches(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    async with (
        start_api(tenants=("acme", "globex")) as api,
        api.client("acme") as acme,
        api.client("globex") as globex,
    ):
        file_id = await _upload(acme, request_file([request_line("a"), request_line("b")]))
        batch = (await _create(acme, file_id)).json()
        batch_id = batch["id"]

        async def finished() -> dict[str, Any]:
            deadline = time.monotonic() + BATCH_DEADLINE_S
            while True:
                got: dict[str, Any] = (await acme.get(f"/openai/v1/batches/{batch_id}")).json()
                if got["status"] in TERMINAL or time.monotonic() > deadline:
                    return got
                await asyncio.sleep(0.05)

        done = await finished()
        assert done["status"] == "completed"
        for method, path in (
            ("GET", f"/openai/v1/files/{file_id}"),
            ("GET", f"/openai/v1/files/{file_id}/content"),
            ("DELETE", f"/openai/v1/files/{file_id}"),
            ("GET", f"/openai/v1/files/{done['output_file_id']}"),
            ("GET", f"/openai/v1/files/{done['output_file_id']}/content"),
            ("GET", f"/openai/v1/batches/{batch_id}"),
            ("POST", f"/openai/v1/batches/{batch_id}/cancel"),
        ):
            assert_openai_error(await globex.request(method, path), 404)
        assert_openai_error(await _create(globex, file_id), 404, param="input_file_id")
        assert (await globex.get("/openai/v1/files")).json()["data"] == []
        assert (await globex.get("/openai/v1/batches")).json()["data"] == []
        # No token, or a wrong one: 401 in OpenAI's shape.
        async with api.client() as anonymous:
            assert_openai_error(await anonymous.get("/openai/v1/batches"), 401)
        async with api.client(headers={"Authorization": "Bearer nope"}) as wrong:
            with pytest.raises(openai.AuthenticationError):
                await openai.AsyncOpenAI(
                    base_url=f"{api.base_url}/openai/v1", api_key="nope", max_retries=0
                ).batches.list()
            assert_openai_error(await wrong.get(f"/openai/v1/files/{file_id}"), 401)
        # acme still has all of it.
        assert (await acme.get(f"/openai/v1/files/{file_id}")).status_code == 200
        assert len(upstream.served) == 2


@pytest.mark.asyncio
async def test_batches_created_at_once_from_one_file_each_run_every_request_once(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    ids = [f"c-{i}" for i in range(60)]
    copies = 5
    async with start_api(tenants=("acme",)) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file([request_line(i) for i in ids]))
        barrier = asyncio.Barrier(copies)
        clients = [api.client("acme") for _ in range(copies)]

        async def create(client: httpx.AsyncClient) -> dict[str, Any]:
            async with client:
                await barrier.wait()
                answer = await _create(client, file_id)
                assert answer.status_code == 200, answer.text
                created: dict[str, Any] = answer.json()
                return created

        created = await asyncio.gather(*(create(c) for c in clients))
        assert len({b["id"] for b in created}) == copies
        for batch in created:
            deadline = time.monotonic() + BATCH_DEADLINE_S
            while batch["status"] not in TERMINAL:
                assert time.monotonic() < deadline, batch
                await asyncio.sleep(0.05)
                batch = (await http.get(f"/openai/v1/batches/{batch['id']}")).json()
            assert batch["status"] == "completed"
            assert batch["request_counts"] == {"total": 60, "completed": 60, "failed": 0}
            content = await http.get(f"/openai/v1/files/{batch['output_file_id']}/content")
            assert _custom_ids(content.content) == ids
        assert len(upstream.served) == copies * len(ids)
        assert await _run_batches(api) == copies


@pytest.mark.asyncio
async def test_a_batch_past_its_window_expires_and_its_queued_requests_stop(
    start_api: StartApi, upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    from pgbatch.workloads.llm.batch_api import service

    async with (
        start_api(tenants=("acme",), worker=False) as api,
        api.client("acme") as http,
    ):
        file_id = await _upload(http, request_file([request_line(f"x{i}") for i in range(10)]))
        batch = (await _create(http, file_id)).json()
        assert batch["status"] == "in_progress"
        monkeypatch.setitem(service.COMPLETION_WINDOWS, "24h", timedelta(0))
        expired = (await http.get(f"/openai/v1/batches/{batch['id']}")).json()
        assert expired["status"] == "expired" and expired["expired_at"] is not None
        assert expired["request_counts"] == {"total": 10, "completed": 0, "failed": 10}
        errors = await http.get(f"/openai/v1/files/{expired['error_file_id']}/content")
        assert sorted(_custom_ids(errors.content)) == sorted(f"x{i}" for i in range(10))
        assert upstream.served == []


async def _admin(running: RunningApi) -> psycopg.AsyncConnection[Any]:
    # From another database: PostgreSQL cannot disallow connections to the current one.
    url = make_conninfo(running.app.db.url, dbname="postgres")
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


@pytest.mark.asyncio
async def test_a_lost_database_is_503_with_retry_after_in_openais_shape(
    start_api: StartApi,
) -> None:
    async with (
        start_api(worker=False, api_pool_timeout_s=1.0) as running,
        running.client(timeout=30) as client,
        await _admin(running) as admin,
    ):
        assert (await client.get("/openai/v1/batches")).status_code == 200
        name = conninfo_to_dict(running.app.db.url)["dbname"]
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                [name],
            )
            for path in ("/openai/v1/batches", "/openai/v1/files/file-1"):
                down = await client.get(path)
                error = assert_openai_error(down, 503)
                assert error["type"] == "server_error"
                assert error["code"] in ("database_unavailable", "database_busy"), error
                assert int(down.headers["retry-after"]) >= 1
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


# Only a hang should fail the large file's requests (the test bounds memory, not time).
LARGE_FILE_TIMEOUT_S = 180.0


@pytest.mark.asyncio
async def test_a_large_file_is_stored_and_validated_without_being_held_in_memory(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    import tracemalloc

    # 40,000 requests of 1.5 KB: 66 MB through upload, storage, validation and submit.
    # (Requests this size: the engine's submit encodes 500 items at a time, so a file of
    # 100 KB requests would hold 50 MB there, whatever this API does.)
    prompt = "y" * 1500
    count = 40_000
    data = request_file([request_line(f"big-{i}", prompt) for i in range(count)])
    assert len(data) > 60_000_000
    form = multipart_form(data)
    # The create reads, validates and submits 66 MB in this process, beside the client and
    # under tracemalloc: ~15 s on an idle 2-core machine, past the client's default 30 s
    # read timeout with the suite's other worker (and other load) running beside it.
    async with (
        start_api(tenants=("acme",), worker=False) as api,
        api.client("acme", timeout=LARGE_FILE_TIMEOUT_S) as http,
    ):
        tracemalloc.start()
        try:
            uploaded = await _streamed_upload(http, form)
            assert uploaded.status_code == 200, uploaded.text
            file_id = uploaded.json()["id"]
            _, upload_peak = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            batch = (await _create(http, file_id)).json()
            _, create_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert batch["status"] == "in_progress", batch
        assert batch["request_counts"]["total"] == count
        # The client's body is allocated before tracing starts, and sent in 64 KiB chunks
        # (httpx's multipart encoder would copy it); what the server holds at once is a
        # spool buffer, a few stored chunks, the engine's COPY buffers and the digests of
        # the custom_ids: 3 MB and 15 MB here, the same for a file of 8 MB.
        for what, peak in (("upload", upload_peak), ("create", create_peak)):
            assert peak < len(data) // 3, f"{what}: peak {peak} B for a {len(data)} B file"


@pytest.mark.asyncio
async def test_requests_too_large_for_a_shard_fail_the_batch_and_nothing_runs(
    start_api: StartApi, upstream: FakeUpstream
) -> None:
    # 50 requests a shard of 2 KB each: past a 64 KiB shard limit, as 50 images of 2 MB
    # are past the default 64 MiB.
    lines = [request_line(f"s{i}", "z" * 2000) for i in range(60)]
    async with (
        start_api(tenants=("acme",), max_shard_bytes=64 * 1024) as api,
        api.client("acme") as http,
    ):
        batch = (await _create(http, await _upload(http, request_file(lines)))).json()
        assert batch["status"] == "failed", batch
        assert _errors_of(batch) == [(None, "invalid_batch", "items")]
        assert "PGBATCH_MAX_SHARD_BYTES" in batch["errors"]["data"][0]["message"]
        assert await _run_batches(api) == 0 and upstream.served == []


@pytest.mark.asyncio
async def test_cancels_sent_at_once_all_answer_the_cancelled_batch(start_api: StartApi) -> None:
    # No worker: the batch's shards stay queued until the cancels land.
    async with start_api(tenants=("acme",), worker=False) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file([request_line(f"q{i}") for i in range(120)]))
        batch_id = (await _create(http, file_id)).json()["id"]
        barrier = asyncio.Barrier(5)
        clients = [api.client("acme") for _ in range(5)]

        async def cancel(client: httpx.AsyncClient) -> httpx.Response:
            async with client:
                await barrier.wait()
                return await client.post(f"/openai/v1/batches/{batch_id}/cancel")

        answers = await asyncio.gather(*(cancel(c) for c in clients))
        assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
        assert {a.json()["status"] for a in answers} == {"cancelled"}
        done = (await http.get(f"/openai/v1/batches/{batch_id}")).json()
        assert done["request_counts"] == {"total": 120, "completed": 0, "failed": 120}
        assert done["cancelling_at"] is not None and done["cancelled_at"] is not None
