"""Issue 10 review: hostile request files through POST /openai/v1/batches."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from pgbatch.workloads.llm.fake_upstream import FakeUpstream
from tests.api.conftest import StartApi
from tests.api.test_openai_batch_api import (
    BATCH_DEADLINE_S,
    ENDPOINT,
    TERMINAL,
    _create,
    _upload,
    request_file,
    request_line,
    upstream,  # noqa: F401  (the fixture)
)


@pytest.mark.asyncio
async def test_a_nul_inside_a_request_body_runs_and_its_answer_is_stored(
    start_api: StartApi,
    upstream: FakeUpstream,  # noqa: F811
) -> None:
    """A NUL is valid JSON text: the request runs and every line has its result."""
    nul_body = orjson.dumps(
        {
            "custom_id": "n",
            "method": "POST",
            "url": ENDPOINT,
            "body": {"model": "m", "messages": [{"role": "user", "content": "a\x00b"}]},
        }
    )
    async with start_api(tenants=("acme",)) as api, api.client("acme") as http:
        data = request_file([request_line("ok1"), nul_body, request_line("ok2")])
        batch = (await _create(http, await _upload(http, data))).json()
        deadline = time.monotonic() + BATCH_DEADLINE_S
        while batch["status"] not in TERMINAL:
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.05)
            batch = (await http.get(f"/openai/v1/batches/{batch['id']}")).json()
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}, batch
