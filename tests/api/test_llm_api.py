"""GET /v1/llm/batches/{id}/usage, GET /v1/llm/limits and the llm series of /metrics."""

from __future__ import annotations

import orjson
import pytest

from pgbatch.workloads import llm
from pgbatch.workloads.llm.config import Limit, LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig
from pgbatch.workloads.llm.usage import parse_prices
from tests.api.conftest import StartApi

SECRET = "sk-never-shown-42"


def _lines(n: int) -> list[bytes]:
    return [
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "max_tokens": 5,
                               "messages": [{"role": "user", "content": f"hi {i}"}]}})
        for i in range(n)
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_usage_limits_and_metrics_over_http(start_api: StartApi) -> None:
    fake = FakeUpstream(api_key=SECRET)
    async with serving(fake) as base_url, start_api(tenants=("acme", "globex")) as running:
        upstream = UpstreamConfig(base_url=base_url, api_key=SECRET, timeout_s=5)
        config = LlmConfig(
            {"default": Upstream("default", upstream, limit=Limit("default", rpm=1000, tpm=10**6))},
            parse_prices({"m": {"input": 2.0, "output": 4.0}}),
        )
        runner_of(running.app).configure(config)
        requests = check_request_lines(_lines(6), "/v1/chat/completions")
        batch = await llm.submit_requests(running.app, requests, tenant="acme")
        await running.app.wait(batch.id, timeout_s=60)
        async with running.client("acme") as acme, running.client("globex") as globex:
            usage = await acme.get(f"/v1/llm/batches/{batch.id}/usage")
            foreign = await globex.get(f"/v1/llm/batches/{batch.id}/usage")
            missing = await acme.get("/v1/llm/batches/999999/usage")
            limits = await acme.get("/v1/llm/limits")
            anonymous = await running.client().get("/v1/llm/limits")
            metrics = await running.client().get("/metrics")
    assert usage.status_code == 200, usage.text
    body = usage.json()
    total = body["total"]
    assert (total["requests"], total["upstream_calls"], total["failed"]) == (6, 6, 0)
    expected = (total["prompt_tokens"] * 2.0 + total["completion_tokens"] * 4.0) / 1e6
    assert body["cost_usd"] == pytest.approx(expected) and body["models"][0]["model"] == "m"
    assert foreign.status_code == 404 and missing.status_code == 404
    assert anonymous.status_code == 401
    assert limits.status_code == 200
    [limit] = limits.json()["limits"]
    assert (limit["name"], limit["rpm"], limit["window_requests"]) == ("default", 1000, 6)
    assert limit["in_flight"] == 0
    text = metrics.text
    assert 'pgbatch_llm_limit_used{bound="requests",limit="default"} 6.0' in text
    assert f'pgbatch_llm_tokens{{kind="prompt",model="m"}} {float(total["prompt_tokens"])}' in text
    for answer in (usage, limits, metrics):
        assert SECRET not in answer.text
