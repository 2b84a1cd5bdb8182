"""The dashboard in a real browser (Debian's headless chromium driven by Playwright).

Progress reaches the page from the event streams alone (no reload, no polling), batches
are retried and cancelled from their page with If-Match, and with tokens on the page
asks for one.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from playwright.async_api import Browser, Locator, Page, async_playwright, expect

from tests.api.conftest import RunningApi, StartApi

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
BUILD = Path(__file__).resolve().parents[2] / "build"
# How long the page may take to show any one expected state: far above what it needs
# (events arrive every sse_min_interval_s = 0.05 s in these tests).
EXPECT_TIMEOUT_MS = 10_000
VIEWPORT = {"width": 1280, "height": 860}

# Records every change of a progress bar's aria-valuenow as [batch id, value].
WATCH_PROGRESS = """() => {
  window.__progress = [];
  new MutationObserver((records) => {
    for (const record of records) {
      const row = record.target.closest("[data-batch-id]");
      window.__progress.push([
        Number(row.dataset.batchId), Number(record.target.getAttribute("aria-valuenow")),
        record.target.getAttribute("aria-label"),
      ]);
    }
  }).observe(document.body, {subtree: true, attributes: true, attributeFilter: ["aria-valuenow"]});
}"""


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    """Return a headless chromium (the test is skipped when it is not installed)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium")
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


async def open_page(browser: Browser, url: str) -> tuple[Page, list[Exception]]:
    """Open the dashboard; return the page and the list its uncaught script errors go to."""
    page = await browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(EXPECT_TIMEOUT_MS)
    errors: list[Exception] = []
    page.on("pageerror", lambda error: errors.append(error))
    await page.goto(url)
    return page, errors


async def submit(client: httpx.AsyncClient, task: str, items: list[Any]) -> int:
    response = await client.post("/v1/batches", json={"task": task, "items": items})
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


async def screenshot(page: Page, tmp_path: Path, name: str) -> Path:
    """Save a screenshot under tmp_path and a copy in build/ (to look at)."""
    shot = tmp_path / name
    await page.screenshot(path=str(shot), full_page=True, animations="disabled")
    BUILD.mkdir(exist_ok=True)
    shutil.copyfile(shot, BUILD / name)
    return shot


async def list_ready(page: Page) -> None:
    """Wait until the list is read and its event stream is open."""
    await expect(page.get_by_test_id("list-view")).to_have_attribute("data-loaded", "true")
    await expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "live")


@pytest.mark.asyncio
async def test_progress_is_live_and_batches_are_retried_and_cancelled_from_their_page(
    api: RunningApi, browser: Browser, tmp_path: Path
) -> None:
    page, errors = await open_page(browser, f"{api.base_url}/")
    await list_ready(page)
    # A reload or navigation would drop these: the page must stay the same document.
    await page.evaluate("window.__sameDocument = true")
    loads: list[Page] = []
    page.on("load", lambda loaded: loads.append(loaded))
    await page.evaluate(WATCH_PROGRESS)
    changes: list[tuple[str, str | None]] = []
    page.on(
        "request",
        lambda r: (
            changes.append((r.method, r.headers.get("if-match")))
            if r.method in ("PATCH", "POST")
            else None
        ),
    )

    async with api.client() as client:
        # Batches of each ending beside the one watched, so every badge gets drawn.
        echo_id = await submit(client, "echo", list(range(25)))
        flaky_id = await submit(client, "flaky", ["ok", "fail", "ok", "ok", "fail"] * 2 + ["raise"])
        slow_id = await submit(client, "slow", [{"sleep": 0.2}] * 40)

        rows = page.get_by_test_id("batch-row")

        def row(batch_id: int) -> Locator:
            return rows.and_(page.locator(f'[data-batch-id="{batch_id}"]'))

        await expect(row(slow_id).get_by_role("progressbar")).to_have_attribute(
            "aria-valuenow", "100"
        )
        await expect(row(slow_id).get_by_test_id("counts")).to_have_text("40 of 40")
        await expect(row(slow_id).get_by_test_id("status-badge")).to_have_attribute(
            "data-status", "succeeded"
        )
        # Each bar on its own: the list's row and the active-jobs drawer follow their own
        # event streams, so their updates interleave in any order (seen on a loaded
        # machine: [..., 57, 60, 57, 60, ...], each bar in order).
        bars: dict[str, list[int]] = {}
        for batch, value, bar in await page.evaluate("window.__progress"):
            if batch == slow_id:
                bars.setdefault(bar, []).append(value)
        seen = bars.get(f"Batch {slow_id} progress", [])
        assert any(0 < value < 100 for value in seen), f"no progress between 0 and 100: {seen}"
        for bar, values in bars.items():
            assert values == sorted(values), f"{bar} went backwards: {values}"
        for batch_id, status in ((echo_id, "succeeded"), (flaky_id, "failed")):
            badge = row(batch_id).get_by_test_id("status-badge")
            await expect(badge).to_have_attribute("data-status", status)

        # The failed batch's page shows its errors; Retry runs its failed shards again.
        await row(flaky_id).get_by_test_id("batch-link").click()
        view = page.get_by_test_id("batch-view")
        await expect(view).to_have_attribute("data-batch-id", str(flaky_id))
        await expect(view.get_by_test_id("error-samples").locator("tbody tr")).to_have_count(5)
        await expect(view.get_by_test_id("dead-shards").locator("tbody tr")).to_have_count(1)
        await view.get_by_test_id("retry-button").click()
        await expect(view.get_by_test_id("notice")).to_contain_text("Re-queued 2 shards")
        await expect(page.get_by_test_id("live-status")).to_have_attribute("data-state", "final")
        await expect(view.get_by_test_id("status-badge")).to_have_attribute("data-status", "failed")
        retried = (await client.get(f"/v1/batches/{flaky_id}")).json()
        assert (retried["status"], retried["run_no"]) == ("failed", 2), retried
        await expect(view.get_by_test_id("throughput-chart")).to_be_visible()
        await screenshot(page, tmp_path, "dashboard-batch.png")
        await page.get_by_test_id("back-link").click()
        await list_ready(page)

        gated_id = await submit(client, "gated", [1, 2, 3])
        # Pending until a shard finishes, which the gate forbids: it is cancelled unfinished.
        await row(gated_id).get_by_test_id("batch-link").click()
        await expect(page).to_have_url(re.compile(rf"#/batches/{gated_id}$"))
        await expect(view).to_have_attribute("data-batch-id", str(gated_id))
        await expect(view).to_have_attribute("data-loaded", "true")
        await expect(view.get_by_test_id("shard-states").locator("li")).to_have_count(5)
        await view.get_by_test_id("cancel-button").click()
        dialog = page.get_by_test_id("confirm-dialog")
        await expect(dialog).to_be_visible()
        await dialog.get_by_test_id("confirm-cancel").click()
        await expect(view.get_by_test_id("status-badge")).to_have_attribute(
            "data-status", "cancelled"
        )
        await expect(view.get_by_test_id("notice")).to_contain_text("Batch cancelled")
        after = (await client.get(f"/v1/batches/{gated_id}")).json()
        assert after["status"] == "cancelled", after
        # Retry and Cancel both named the version they acted on.
        assert [
            (method, re.fullmatch(r'"\d+"', tag or "") is not None) for method, tag in changes
        ] == [
            ("POST", True),
            ("PATCH", True),
        ], changes
        await expect(view.get_by_test_id("cancel-button")).to_be_disabled()
        await screenshot(page, tmp_path, "dashboard-cancelled.png")

        # Back on the list, with one batch still running for the picture.
        await page.get_by_test_id("back-link").click()
        await list_ready(page)
        busy_id = await submit(client, "slow", [{"sleep": 0.05}] * 240)
        busy = row(busy_id).get_by_role("progressbar")
        await expect(busy).to_have_attribute("aria-valuenow", re.compile(r"^([3-9]\d)$"))
        await expect(row(gated_id).get_by_test_id("status-badge")).to_have_attribute(
            "data-status", "cancelled"
        )
        await screenshot(page, tmp_path, "dashboard.png")

    assert await page.evaluate("window.__sameDocument") is True
    assert loads == [], "the page loaded again"
    assert errors == []


@pytest.mark.asyncio
async def test_the_page_asks_for_a_token_and_then_shows_the_tenants_batches(
    start_api: StartApi, browser: Browser, tmp_path: Path
) -> None:
    async with start_api(tenants=("acme", "other")) as api:
        async with api.client("acme") as acme, api.client("other") as other:
            mine = await submit(acme, "echo", list(range(12)))
            theirs = await submit(other, "echo", [1])
            await api.app.wait(mine, timeout_s=10)
            await api.app.wait(theirs, timeout_s=10)

            page, errors = await open_page(browser, f"{api.base_url}/")
            form = page.get_by_test_id("token-form")
            await expect(form).to_be_visible()
            await page.get_by_test_id("token-input").fill("pgb_not-a-token")
            await page.get_by_test_id("token-submit").click()
            await expect(page.get_by_test_id("token-error")).to_be_visible()
            await screenshot(page, tmp_path, "dashboard-token.png")
            await page.get_by_test_id("token-input").fill(api.tokens["acme"])
            await page.get_by_test_id("token-submit").click()
            await list_ready(page)

            rows = page.get_by_test_id("batch-row")
            await expect(rows).to_have_count(1)
            await expect(rows.first).to_have_attribute("data-batch-id", str(mine))
            await expect(rows.first.get_by_test_id("counts")).to_have_text("12 of 12")
            # The event stream is authenticated too (?access_token=): a new batch appears live.
            later = await submit(acme, "echo", list(range(3)))
            await submit(other, "echo", [2])
            later_row = rows.and_(page.locator(f'[data-batch-id="{later}"]'))
            await expect(later_row.get_by_role("progressbar")).to_have_attribute(
                "aria-valuenow", "100"
            )
            await expect(rows).to_have_count(2)

            # The token lasts as long as the tab: a reload does not ask again.
            await page.reload()
            await list_ready(page)
            await expect(form).to_have_count(0)
            await expect(rows).to_have_count(2)
            assert errors == []


@pytest.mark.asyncio
async def test_older_batches_are_a_page_away_and_filters_ask_the_api(
    api: RunningApi, browser: Browser
) -> None:
    async with api.client() as client:
        for n in range(53):
            await submit(client, "echo", [n])
        flaky = await submit(client, "flaky", ["raise"])
        await api.app.wait(flaky, timeout_s=10)

    page, errors = await open_page(browser, f"{api.base_url}/")
    await list_ready(page)
    rows = page.get_by_test_id("batch-row")
    await expect(rows).to_have_count(50)  # the first page
    await expect(rows.first).to_have_attribute("data-batch-id", str(flaky))
    await page.get_by_test_id("load-more").click()
    await expect(rows).to_have_count(54)
    await expect(page.get_by_test_id("load-more")).to_be_hidden()

    await page.get_by_test_id("filter-failed").check()
    await expect(rows).to_have_count(1)
    await expect(page).to_have_url(re.compile(r"#/\?status=failed$"))
    await page.get_by_test_id("filter-task").fill("no-such-task")
    await expect(page.get_by_test_id("empty")).to_contain_text("No batches match")
    assert errors == []


@pytest.mark.asyncio
async def test_the_list_keeps_progress_and_counts_in_view_at_phone_width(
    api: RunningApi, browser: Browser, tmp_path: Path
) -> None:
    async with api.client() as client:
        batch_id = await submit(client, "echo", list(range(12)))
    page = await browser.new_page(viewport={"width": 360, "height": 740})
    page.set_default_timeout(EXPECT_TIMEOUT_MS)
    await page.goto(f"{api.base_url}/")
    await list_ready(page)
    row = page.locator(f'[data-testid="batch-row"][data-batch-id="{batch_id}"]')
    await expect(row.get_by_test_id("counts")).to_have_text("12 of 12")
    # In view means inside the viewport, not behind a horizontal scroll of the table.
    for part in (row.get_by_role("progressbar"), row.get_by_test_id("counts"),
                 row.get_by_test_id("status-badge"), row.get_by_test_id("batch-link")):  # fmt: skip
        await expect(part).to_be_visible()
        box = await part.bounding_box()
        assert box is not None and box["width"] > 0
        assert 0 <= box["x"] and box["x"] + box["width"] <= 360, (await part.inner_html(), box)
    await screenshot(page, tmp_path, "dashboard-phone.png")
