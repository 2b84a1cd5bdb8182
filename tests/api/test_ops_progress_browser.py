"""Issue 12 §2-3 in a real browser: batch names and metadata on both pages (HTML in them
shown as text, never run) and the list's filters on them; a cancelled batch shown with
its cancelled items apart and never at 100 %; the collection-copy view; and the drawer of
active jobs, reachable from every page and kept current by the event stream."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, expect

from pgbatch.workloads import collections as copies
from tests.api.conftest import RunningApi
from tests.api.support import STREAM_TIMEOUT_S
from tests.api.test_dashboard_browser import (  # noqa: F401 (browser is a fixture)
    browser,
    list_ready,
    open_page,
    screenshot,
)
from tests.helpers import wait_until

# Markup that would run or inject if any of it reached innerHTML.
HOSTILE_NAME = '<img src=x onerror="window.__pwned=1">nightly</td>'
HOSTILE_VALUE = "<script>window.__pwned=2</script>&amp;"


async def _submit(api: RunningApi, **body: Any) -> int:
    async with api.client() as client:
        response = await client.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


@pytest.mark.asyncio
async def test_names_and_metadata_are_shown_as_text_and_filter_the_list(
    api: RunningApi,
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    hostile = await _submit(
        api,
        task="echo",
        items=[1],
        name=HOSTILE_NAME,
        metadata={"owner": HOSTILE_VALUE, "project": "alpha"},
    )
    other = await _submit(api, task="echo", items=[1], name="weekly", metadata={"project": "beta"})
    page, errors = await open_page(browser, f"{api.base_url}/")
    await list_ready(page)
    rows = page.get_by_test_id("batch-row")
    await expect(rows).to_have_count(2)
    hostile_row = page.locator(f'[data-testid="batch-row"][data-batch-id="{hostile}"]')
    await expect(hostile_row.get_by_test_id("batch-name")).to_have_text(HOSTILE_NAME)
    assert await hostile_row.locator("img").count() == 0

    await page.get_by_test_id("filter-name").fill("weekly")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-batch-id", str(other))
    await expect(page).to_have_url(re.compile(r"name=weekly"))
    await page.get_by_test_id("filter-name").fill("")
    await page.get_by_test_id("filter-metadata").fill("project:alpha")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_attribute("data-batch-id", str(hostile))
    await expect(page).to_have_url(re.compile(r"metadata=project%3Aalpha"))
    # A new batch that matches appears live; one that does not stays out.
    late = await _submit(api, task="echo", items=[1], metadata={"project": "alpha"})
    await _submit(api, task="echo", items=[1], metadata={"project": "gamma"})
    await expect(rows).to_have_count(2)
    await expect(rows.first).to_have_attribute("data-batch-id", str(late))

    await hostile_row.get_by_test_id("batch-link").click()
    view = page.get_by_test_id("batch-view")
    await expect(view).to_have_attribute("data-loaded", "true")
    await expect(view.get_by_test_id("batch-title")).to_have_text(HOSTILE_NAME)
    chips = view.get_by_test_id("metadata").locator("li")
    await expect(chips).to_have_count(2)
    await expect(chips.first).to_have_text(f"owner: {HOSTILE_VALUE}")
    assert await view.locator("img, script").count() == 0
    assert await page.evaluate("window.__pwned") is None
    await screenshot(page, tmp_path, "dashboard-labels.png")
    assert errors == []


@pytest.mark.asyncio
async def test_a_cancelled_batch_shows_its_cancelled_items_and_never_100_percent(
    api: RunningApi,
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    items: list[Any] = [{"sleep": 0}] * 3 + [{"sleep": 60}] * 20
    batch_id = await _submit(
        api, task="slow", items=items, shard_size=1, lease_ttl_s=1.5, name="to cancel"
    )
    page, errors = await open_page(browser, f"{api.base_url}/#/batches/{batch_id}")
    view = page.get_by_test_id("batch-view")
    await expect(view.get_by_test_id("items-ok")).to_have_text("3")
    await view.get_by_test_id("cancel-button").click()
    await page.get_by_test_id("confirm-dialog").get_by_test_id("confirm-cancel").click()
    await expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "final")
    await expect(view.get_by_test_id("items-cancelled")).to_have_text("20")
    await expect(view.get_by_test_id("items-failed")).to_have_text("0")
    bar = view.get_by_role("progressbar").first
    # 3 of 23 ran: 13 %, and the bar says how many were cancelled.
    await expect(bar).to_have_attribute("aria-valuenow", "13")
    await expect(bar).to_have_attribute("aria-valuetext", re.compile(r"20 cancelled"))
    await expect(view.get_by_test_id("headline")).to_have_text("3 of 23 items")
    await expect(view.get_by_test_id("pace")).to_have_text(re.compile(r"^waited .+ · ran .+$"))
    await expect(view.get_by_test_id("details")).to_contain_text("waited")
    await screenshot(page, tmp_path, "dashboard-cancelled-counts.png")

    await page.get_by_test_id("back-link").click()
    await list_ready(page)
    row = page.locator(f'[data-testid="batch-row"][data-batch-id="{batch_id}"]')
    await expect(row.get_by_test_id("cancelled-count")).to_have_text("20 cancelled")
    await expect(row.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "13")
    await expect(row.get_by_test_id("counts")).to_have_text("3 of 23")
    assert "100%" not in await row.inner_text()
    assert errors == []


@pytest.mark.asyncio
async def test_the_copy_view_and_the_active_jobs_drawer(
    api: RunningApi,
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    source, target = "co<i>src</i>", "dst"
    await copies.create_collection(api.app, source)
    await copies.seed_items(api.app, source, 2_500)
    await copies.create_collection(api.app, target)
    await copies.add_items(api.app, target, ["company-000000001", "company-000000002"])
    copy = await copies.submit_copy(api.app, source=source, target=target, item_ids=None)
    await api.app.wait(copy.id, timeout_s=30)
    # A job that stays active until the test opens the gate.
    export = await _submit(api, task="gated", items=[1], name="export <b>nightly</b>")

    page, errors = await open_page(browser, f"{api.base_url}/")
    await list_ready(page)
    button = page.get_by_test_id("jobs-button")
    await expect(page.get_by_test_id("jobs-count")).to_have_text("1")
    # The count follows the stream with the drawer shut: a new job shows at once.
    second = await _submit(api, task="gated", items=[1])
    await expect(page.get_by_test_id("jobs-count")).to_have_text("2")
    await button.click()
    drawer = page.get_by_test_id("jobs-drawer")
    await expect(drawer).to_be_visible()
    jobs = drawer.get_by_test_id("job")
    await expect(jobs).to_have_count(2)
    # Newest first; a job without a name shows its task and id.
    await expect(jobs.nth(0).get_by_test_id("job-title")).to_have_text(f"gated #{second}")
    await expect(jobs.nth(1).get_by_test_id("job-title")).to_have_text("export <b>nightly</b>")
    await screenshot(page, tmp_path, "dashboard-jobs-drawer.png")
    await jobs.nth(1).get_by_test_id("job-link").click()
    await expect(page).to_have_url(re.compile(rf"#/batches/{export}$"))
    await expect(drawer).to_be_hidden()

    # The drawer is on every page: here on a batch's page, and it follows the stream.
    await button.click()
    await expect(jobs).to_have_count(2)
    api.gate.set()

    async def ended() -> bool:
        return all([(await api.app.get_batch(b)).is_final for b in (export, second)])

    await wait_until(ended, STREAM_TIMEOUT_S, message="the gated job never ended")
    await expect(jobs).to_have_count(0)
    await expect(drawer.get_by_test_id("jobs-empty")).to_be_visible()
    await expect(page.get_by_test_id("jobs-count")).to_have_text("0")
    await page.keyboard.press("Escape")
    await expect(drawer).to_be_hidden()

    # The copy's page: source → target, associations out of the total (not key ranges).
    await page.goto(f"{api.base_url}/#/batches/{copy.id}")
    view = page.get_by_test_id("copy-view")
    await expect(view).to_have_attribute("data-finished", "true")
    await expect(view.get_by_test_id("copy-source")).to_have_text(source)
    await expect(view.get_by_test_id("copy-target")).to_have_text(target)
    await expect(view.get_by_test_id("copy-inserted")).to_have_text("2,498")
    await expect(view.get_by_test_id("copy-present")).to_have_text("2")
    await expect(view.get_by_test_id("copy-total")).to_have_text("2,500")
    await expect(view.get_by_test_id("copy-progress")).to_have_attribute("aria-valuenow", "100")
    assert await view.locator("i").count() == 0
    await expect(page.get_by_test_id("batch-title")).to_have_text(f"copy {source} → {target}")
    await screenshot(page, tmp_path, "dashboard-copy.png")
    assert errors == []
