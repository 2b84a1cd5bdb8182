"""The LLM workload end to end: checked request lines in, OpenAI batch output lines out."""

from __future__ import annotations

import asyncio

import orjson
import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm import batches
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines


def _line(custom_id: str, prompt: str) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8}
    return orjson.dumps(
        {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}
    )


@pytest.mark.asyncio
async def test_a_request_file_runs_and_reads_back_as_output_and_error_lines(
    app: pgbatch.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUpstream()
    async with serving(fake) as base_url:
        monkeypatch.setenv("PGBATCH_LLM_BASE_URL", base_url)
        app.use(llm.WORKLOAD)
        lines = [_line("a", "hello"), _line("b", "bad [fake:400]"), _line("c", "world")]
        requests = check_request_lines(lines, "/v1/chat/completions")
        batch = await llm.submit_requests(app, requests)
        worker = app.worker(concurrency=4)
        running = asyncio.create_task(worker.run())
        try:
            done = await app.wait(batch.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        assert (done.items_ok, done.items_failed) == (2, 1)
        output = [line async for line in llm.output_lines(app, batch.id)]
        errors = [line async for line in llm.output_lines(app, batch.id, errors=True)]
    assert [line["custom_id"] for line in output] == ["a", "c"]
    assert all(line["response"]["status_code"] == 200 for line in output)
    assert [line["custom_id"] for line in errors] == ["b"]
    assert errors[0]["response"]["status_code"] == 400
    assert len({line["id"] for line in output + errors}) == 3
    await batches.upstream_client_close()
