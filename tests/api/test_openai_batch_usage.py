"""Issue 10 review: a batch made through /openai/v1 reports its tokens in `usage`, as
OpenAI's batch object does (the merge left it out: `batch.usage` was None)."""

from __future__ import annotations

import asyncio
import time

import openai
import orjson
import pytest

from pgbatch.workloads.llm.fake_upstream import FakeUpstream
from tests.api.conftest import StartApi
from tests.api.test_openai_batch_api import (
    BATCH_DEADLINE_S,
    ENDPOINT,
    TERMINAL,
    request_file,
    request_line,
    upstream,  # noqa: F401  (the fixture)
)


@pytest.mark.asyncio
async def test_an_openai_batch_object_carries_the_usage_of_its_requests(
    start_api: StartApi,
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    async with start_api(tenants=("acme",)) as api:
        client = openai.AsyncOpenAI(
            base_url=f"{api.base_url}/openai/v1", api_key=api.tokens["acme"], max_retries=0
        )
        ids = [f"u-{i}" for i in range(12)]
        uploaded = await client.files.create(
            file=("u.jsonl", request_file([request_line(i) for i in ids])), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h"
        )
        deadline = time.monotonic() + BATCH_DEADLINE_S
        while batch.status not in TERMINAL:
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.05)
            batch = await client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.output_file_id is not None
        output = (await client.files.content(batch.output_file_id)).content
        prompt = completion = 0
        for line in output.splitlines():
            usage = orjson.loads(line)["response"]["body"]["usage"]
            prompt += usage["prompt_tokens"]
            completion += usage["completion_tokens"]
        assert prompt > 0 and completion > 0
        assert batch.usage is not None, "the batch object has no usage"
        assert (batch.usage.input_tokens, batch.usage.output_tokens) == (prompt, completion)
        assert batch.usage.total_tokens == prompt + completion
        assert batch.usage.input_tokens_details.cached_tokens == 0
        listed = [b for b in (await client.batches.list()).data if b.id == batch.id]
        assert listed[0].usage == batch.usage
        await client.close()
