"""The batch page's failures in a real browser: error groups (count, first and last seen,
sample items with their input) and tracebacks collapsed, markup shown as text."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.api.conftest import RunningApi
from tests.api.test_dashboard_browser import browser, open_page, screenshot, submit

__all__ = ["browser"]  # the fixture, imported so that pytest finds it here

# Markup a page that parsed HTML would run or render: it must show as text.
HOSTILE = '<img src=x onerror="window.__owned=1"><b>bold</b> [/red]'


@pytest.mark.asyncio
async def test_error_groups_and_collapsed_tracebacks_on_the_batch_page(
    api: RunningApi, browser: Browser, tmp_path: Path
) -> None:
    async with api.client() as client:
        items = [{"raise": HOSTILE, "n": n} if n in (2, 5, 7) else n for n in range(10)]
        poison_id = await submit(client, "poison", items)
        flaky_id = await submit(client, "flaky", ["fail", "ok", "raise"])
        await api.app.wait(poison_id, timeout_s=20)
        await api.app.wait(flaky_id, timeout_s=20)

    page, errors = await open_page(browser, f"{api.base_url}/#/batches/{poison_id}")
    view = page.get_by_test_id("batch-view")
    await expect(view).to_have_attribute("data-loaded", "true")
    groups = view.get_by_test_id("error-group")
    # The three poison items raised the same message: one group, its samples in order.
    await expect(groups).to_have_count(1)
    first = groups.first
    await expect(first.get_by_test_id("error-group-count")).to_have_text("3 items")
    await expect(first.get_by_test_id("error-group-error")).to_contain_text(
        f"ValueError: {HOSTILE}"
    )
    await expect(first).to_contain_text("First seen")
    await expect(first).to_contain_text("last seen")
    samples = first.get_by_test_id("error-group-sample")
    await expect(samples).to_have_count(3)
    for index, seq in enumerate((2, 5, 7)):
        await expect(samples.nth(index)).to_have_attribute("data-seq", str(seq))
    sample = samples.first
    await expect(sample.get_by_test_id("sample-input")).to_contain_text('"n":2')
    # The traceback is collapsed until asked for, then shown as text, markup and all.
    details = sample.get_by_test_id("traceback")
    text = details.locator("pre")
    await expect(text).to_be_hidden()
    await details.locator("summary").click()
    await expect(text).to_be_visible()
    await expect(text).to_contain_text("in poison")
    await expect(text).to_contain_text(f"ValueError: {HOSTILE}")
    assert await text.locator("img, b").count() == 0
    # The batch's last error: the shard whose poison items failed alone, collapsed too.
    last = view.get_by_test_id("last-error")
    await expect(last.get_by_test_id("last-error-text")).to_contain_text(
        "3 of 10 items failed alone"
    )
    await expect(last.get_by_test_id("traceback").locator("pre")).to_be_hidden()
    assert await page.evaluate("window.__owned") is None
    await screenshot(page, tmp_path, "dashboard-failures.png")

    # A whole dead shard: its traceback on its dead-shards row, its group's sample too.
    await page.goto(f"{api.base_url}/#/batches/{flaky_id}")
    await expect(view).to_have_attribute("data-batch-id", str(flaky_id))
    dead = view.get_by_test_id("dead-shards").locator("tbody tr")
    await expect(dead).to_have_count(1)
    await dead.get_by_test_id("traceback").locator("summary").click()
    await expect(dead.get_by_test_id("traceback").locator("pre")).to_contain_text(
        "RuntimeError: the shard asked to fail"
    )
    # The dead shard's three items share its error: one group, the traceback on each sample.
    flaky_groups = view.get_by_test_id("error-group")
    await expect(flaky_groups).to_have_count(1)
    await expect(flaky_groups.get_by_test_id("error-group-count")).to_have_text("3 items")
    await expect(flaky_groups.get_by_test_id("traceback")).to_have_count(3)
    assert errors == []
