"""Issue 10 review: a batch created through /openai/v1 could not ask for the opt-in cache
or a named upstream (BatchCreate refused any field OpenAI lacks, and create_batch never
passed them on), and a named upstream nobody configured was accepted at submit and only
failed each shard at run time. pgbatch's extensions, sent with the openai client's
`extra_body`: `cache` (bool) and `upstream` (a configured upstream's name)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest

from pgbatch.workloads.llm.fake_upstream import FakeUpstream
from tests.api.conftest import StartApi
from tests.api.test_openai_batch_api import (
    BATCH_DEADLINE_S,
    ENDPOINT,
    TERMINAL,
    _run_batches,
    _upload,
    request_file,
    request_line,
    upstream,  # noqa: F401  (the fixture)
)


async def _run(client: openai.AsyncOpenAI, file_id: str, **extra: Any) -> Any:
    batch = await client.batches.create(
        input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h", extra_body=extra
    )
    deadline = time.monotonic() + BATCH_DEADLINE_S
    while batch.status not in TERMINAL:
        assert time.monotonic() < deadline, batch
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    return batch


@pytest.mark.asyncio
async def test_an_openai_batch_can_use_the_cache_and_a_rerun_calls_nobody(
    start_api: StartApi,
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    async with start_api(tenants=("acme",)) as api:
        client = openai.AsyncOpenAI(
            base_url=f"{api.base_url}/openai/v1", api_key=api.tokens["acme"], max_retries=0
        )
        data = request_file([request_line(f"c{i}", f"prompt {i}") for i in range(10)])
        uploaded = await client.files.create(file=("c.jsonl", data), purpose="batch")
        first = await _run(client, uploaded.id, cache=True)
        assert first.status == "completed" and len(upstream.served) == 10
        second = await _run(client, uploaded.id, cache=True)
        assert second.status == "completed", second
        assert len(upstream.served) == 10, "a cached rerun reached the upstream"
        assert second.output_file_id is not None
        await client.close()


@pytest.mark.asyncio
async def test_an_unknown_upstream_is_400_naming_it_and_nothing_is_recorded(
    start_api: StartApi,
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    async with start_api(tenants=("acme",), worker=False) as api, api.client("acme") as http:
        file_id = await _upload(http, request_file([request_line("u1")]))
        answer = await http.post(
            "/openai/v1/batches",
            json={
                "input_file_id": file_id,
                "endpoint": ENDPOINT,
                "completion_window": "24h",
                "upstream": "nowhere",
            },
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"] == "upstream" and "nowhere" in error["message"], error
        assert (await http.get("/openai/v1/batches")).json()["data"] == []
        assert await _run_batches(api) == 0
