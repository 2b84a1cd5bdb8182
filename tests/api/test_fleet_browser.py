"""The dashboard's fleet strip and waiting reasons in a real browser (issue 12 §2): live
workers and slots, queues with depth and paused state, and a batch nothing will run
saying so instead of "waiting N min"."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.api import test_dashboard_browser as dashboard
from tests.api.conftest import StartApi
from tests.api.test_dashboard_browser import list_ready, open_page, screenshot, submit

# The dashboard test's headless chromium fixture, shared (skipped when it is missing).
browser = dashboard.browser

BEAT = {"worker_beat_s": 0.1, "worker_ttl_s": 2.0}


@pytest.mark.asyncio
async def test_the_strip_shows_workers_and_queues_and_a_paused_queue_is_explained(
    start_api: StartApi, browser: Browser, tmp_path: Path
) -> None:
    async with start_api(**BEAT) as api, api.client() as client:
        page, errors = await open_page(browser, f"{api.base_url}/")
        await list_ready(page)
        strip = page.get_by_test_id("fleet-strip")
        await expect(strip).to_be_visible()
        await expect(page.get_by_test_id("fleet-workers")).to_contain_text("1 live")
        batch_id = await submit(client, "gated", [1, 2, 3])
        # The gated shards hold 3 of the worker's 8 slots.
        await expect(page.get_by_test_id("fleet-workers")).to_contain_text("3/8 slots in use")
        default = page.locator("[data-testid=fleet-queue][data-queue=default]")
        await expect(default).to_contain_text("3 running")
        await expect(default).to_have_attribute("data-paused", "false")

        # Paused: the strip and the batch's page say so.
        assert (await client.post("/v1/queues/default/pause")).status_code == 200
        await expect(default).to_have_attribute("data-paused", "true")
        await expect(default.get_by_test_id("fleet-paused")).to_have_text("paused")
        await page.goto(f"{api.base_url}/#/batches/{batch_id}")
        waiting = page.get_by_test_id("waiting-reason")
        await expect(waiting).to_be_visible()
        await expect(waiting).to_have_attribute("data-reason", "queue_paused")
        await expect(waiting).to_contain_text("Queue “default” is paused")
        await expect(page.get_by_test_id("pace")).to_contain_text("queue paused")
        await screenshot(page, tmp_path, "dashboard-fleet-paused.png")

        assert (await client.post("/v1/queues/default/resume")).status_code == 200
        await expect(waiting).to_be_hidden()
        api.gate.set()
        await expect(page.get_by_test_id("batch-view")).to_have_attribute(
            "data-status", "succeeded"
        )
        assert errors == []


@pytest.mark.asyncio
async def test_a_batch_no_live_worker_serves_says_so_in_the_list_and_its_page(
    start_api: StartApi, browser: Browser, tmp_path: Path
) -> None:
    async with start_api(worker=False, **BEAT) as api, api.client() as client:
        batch_id = await submit(client, "echo", [1, 2])
        page, errors = await open_page(browser, f"{api.base_url}/")
        await list_ready(page)
        await expect(page.get_by_test_id("fleet-workers")).to_contain_text("none live")
        row = page.locator(f"[data-testid=batch-row][data-batch-id='{batch_id}']")
        await expect(row.locator(".pace")).to_have_attribute("data-waiting", "no_live_worker")
        await expect(row.locator(".pace")).to_contain_text("no live worker")
        await screenshot(page, tmp_path, "dashboard-fleet-no-worker.png")
        await row.get_by_test_id("batch-link").click()
        waiting = page.get_by_test_id("waiting-reason")
        await expect(waiting).to_contain_text("No live worker serves task “echo”")
        assert errors == []
