"""`pgbatch llm submit / results / status / limits` as a user runs them, on a real database."""

from __future__ import annotations

import asyncio
from pathlib import Path

import orjson
import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm.config import Limit, LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig
from tests.helpers import fetch_one, run_cli


def _line(custom_id: str, prompt: str) -> bytes:
    return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "m", "max_tokens": 4,
                                  "messages": [{"role": "user", "content": prompt}]}})  # fmt: skip


@pytest.mark.asyncio
async def test_a_bad_file_is_refused_with_its_line_numbers_and_nothing_is_submitted(
    tmp_path: Path, database_url: str
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join([_line("a", "x"), b"{not json", _line("a", "dup")]) + b"\n")
    result = await run_cli("llm", "submit", str(path), database_url=database_url)
    assert result.code == 1, result
    assert "line 2" in result.stderr and "invalid_json_line" in result.stderr
    assert "line 3" in result.stderr and "duplicate_custom_id" in result.stderr
    assert "nothing submitted" in result.stderr and "Traceback" not in result.stderr
    assert await fetch_one(database_url, "SELECT count(*) FROM pgbatch.batches") == (0,)


@pytest.mark.asyncio
async def test_submit_then_results_and_usage_through_the_cli(
    tmp_path: Path, database_url: str, app: pgbatch.App
) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(b"\n".join(_line(f"c{i}", f"hello {i}") for i in range(5)) + b"\n")
    fake = FakeUpstream()
    async with serving(fake) as base_url:
        submitted = await run_cli(
            "llm", "submit", str(path), "--json", "--endpoint", "/v1/chat/completions",
            database_url=database_url,
        )  # fmt: skip
        assert submitted.code == 0, submitted
        batch_id = orjson.loads(submitted.stdout)["id"]
        app.use(llm.WORKLOAD)
        upstream = UpstreamConfig(base_url=base_url, timeout_s=5)
        runner_of(app).configure(
            LlmConfig({"default": Upstream("default", upstream, limit=Limit("default", rpm=100))})
        )
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            out = tmp_path / "out.jsonl"
            results = await run_cli(
                "llm", "results", str(batch_id), "-o", str(out), database_url=database_url
            )
            usage = await run_cli(
                "llm", "status", str(batch_id), "--json", database_url=database_url
            )
            limits = await run_cli("llm", "limits", database_url=database_url)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
            await runner_of(app).aclose()
    assert results.code == 0, results
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["custom_id"] for line in lines] == [f"c{i}" for i in range(5)]
    assert "5 output lines written" in results.stderr
    assert usage.code == 0, usage
    assert orjson.loads(usage.stdout)["total"]["requests"] == 5
    assert limits.code == 0 and "default" in limits.stdout and "5/100" in limits.stdout
