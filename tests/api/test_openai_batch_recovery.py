"""Issue 10 review: a POST /openai/v1/batches whose server died mid-create left its batch
`validating` for ever. Such a batch, once older than VALIDATION_STALE, is resumed on read
if its requests had been submitted (the pgbatch batch of its idempotency key), or failed
with `validation_interrupted` if not."""

from __future__ import annotations

from typing import Any

import pytest

from pgbatch.workloads.llm.batch_api import service
from pgbatch.workloads.llm.db import openai as queries
from pgbatch.workloads.llm.requests import parse_request_line
from tests.api.conftest import StartApi
from tests.api.test_openai_batch_api import (
    ENDPOINT,
    _run_batches,
    _upload,
    request_file,
    request_line,
)


async def _crashed_create(api: object, file_id: str) -> int:
    """Do what create_batch does before a crash: record the batch, validating."""
    return await queries.insert_batch(
        api.app.db,  # type: ignore[attr-defined]
        "acme",
        input_file_id=service.parse_file_id(file_id).file_id or 0,
        endpoint=ENDPOINT,
        completion_window="24h",
        metadata=None,
    )


async def _age(api: object, batch_id: int) -> None:
    async with api.app.db.connection() as conn:  # type: ignore[attr-defined]
        await conn.execute(
            "UPDATE pgbatch.llm_batches SET created_at = created_at - interval '2 hours'"
            " WHERE id = %s",
            [batch_id],
        )


@pytest.mark.asyncio
async def test_a_create_that_died_validating_is_failed_once_stale(start_api: StartApi) -> None:
    async with start_api(tenants=("acme",), worker=False) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file([request_line(f"r{i}") for i in range(5)]))
        batch_id = await _crashed_create(api, file_id)
        fresh = (await http.get(f"/openai/v1/batches/batch_{batch_id}")).json()
        assert fresh["status"] == "validating"  # a create may still be at work
        await _age(api, batch_id)
        stale = (await http.get(f"/openai/v1/batches/batch_{batch_id}")).json()
        assert stale["status"] == "failed", stale
        assert [e["code"] for e in stale["errors"]["data"]] == ["validation_interrupted"]
        listed = (await http.get("/openai/v1/batches")).json()["data"]
        assert [b["status"] for b in listed] == ["failed"]
        assert await _run_batches(api) == 0


@pytest.mark.asyncio
async def test_a_create_that_died_after_its_submit_is_resumed_once_stale(
    start_api: StartApi,
) -> None:
    from pgbatch.workloads.llm.batches import submit_requests

    async with start_api(tenants=("acme",), worker=False) as api, api.client("acme") as http:
        lines = [request_line(f"r{i}") for i in range(5)]
        file_id = await _upload(http, request_file(lines))
        batch_id = await _crashed_create(api, file_id)
        requests = [parse_request_line(line, n, ENDPOINT) for n, line in enumerate(lines, 1)]
        await submit_requests(
            api.app, requests, tenant="acme", idempotency_key=f"openai-batch:{batch_id}"
        )
        await _age(api, batch_id)
        resumed = (await http.get(f"/openai/v1/batches/batch_{batch_id}")).json()
        assert resumed["status"] == "in_progress", resumed
        assert resumed["request_counts"]["total"] == 5
        assert await _run_batches(api) == 1


@pytest.mark.asyncio
async def test_a_slow_create_whose_batch_was_failed_meanwhile_cancels_its_run(
    start_api: StartApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datetime import timedelta

    real_submit = service.submit_requests

    async def submit_after_a_stale_read(app: Any, requests: Any, **options: Any) -> Any:
        # Another client reads the batch while this create is still validating, late.
        openai_id = str(options["idempotency_key"]).removeprefix("openai-batch:")
        seen = await service.get_batch(app, options["tenant"], f"batch_{openai_id}")
        assert seen["status"] == "failed"
        return await real_submit(app, requests, **options)

    monkeypatch.setattr(service, "VALIDATION_STALE", timedelta(0))
    monkeypatch.setattr(service, "submit_requests", submit_after_a_stale_read)
    async with start_api(tenants=("acme",), worker=False) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file([request_line(f"r{i}") for i in range(5)]))
        created = await http.post(
            "/openai/v1/batches",
            json={"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"},
        )
        assert created.json()["status"] == "failed", created.text
        async with api.app.db.connection() as conn:
            cur = await conn.execute("SELECT status FROM pgbatch.batches")
            assert [row[0] for row in await cur.fetchall()] == ["cancelled"]
