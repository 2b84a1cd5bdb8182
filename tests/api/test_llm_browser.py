"""The dashboard's usage card on an LLM batch's page (js/llm.js), in a real browser."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from playwright.async_api import Browser, expect

from pgbatch.workloads import llm
from pgbatch.workloads.llm.config import LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig
from pgbatch.workloads.llm.usage import parse_prices
from tests.api.conftest import StartApi
from tests.api.test_dashboard_browser import browser, open_page, screenshot

__all__ = ["browser"]  # the fixture, re-used


@pytest.mark.asyncio
async def test_an_llm_batch_page_shows_its_usage_and_cost(
    start_api: StartApi, browser: Browser, tmp_path: Path
) -> None:
    fake = FakeUpstream()
    lines = [
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "max_tokens": 5,
                               "messages": [{"role": "user", "content": f"hi {i}"}]}})
        for i in range(5)
    ]  # fmt: skip
    async with serving(fake) as base_url, start_api() as running:
        config = LlmConfig(
            {"default": Upstream("default", UpstreamConfig(base_url=base_url))},
            parse_prices({"m": {"input": 1.0, "output": 1.0}}),
        )
        runner_of(running.app).configure(config)
        batch = await llm.submit_requests(
            running.app, check_request_lines(lines, "/v1/chat/completions")
        )
        await running.app.wait(batch.id, timeout_s=60)
        page, errors = await open_page(browser, f"{running.base_url}/#/batches/{batch.id}")
        card = page.get_by_test_id("llm-usage")
        await expect(card).to_have_attribute("data-loaded", "true")
        await expect(page.get_by_test_id("llm-requests")).to_have_text("5")
        await expect(page.get_by_test_id("llm-upstream_calls")).to_have_text("5")
        await expect(page.get_by_test_id("llm-cost")).to_contain_text("$0.0000")
        await screenshot(page, tmp_path, "llm-usage.png")
    assert errors == []
