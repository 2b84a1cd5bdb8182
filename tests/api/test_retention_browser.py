"""The dashboard on a pruned batch: "expired", with when, not "no such batch"."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from playwright.async_api import Browser, expect

from tests.api.conftest import RunningApi
from tests.api.test_dashboard_browser import browser, open_page, screenshot  # noqa: F401


@pytest.mark.asyncio
async def test_a_pruned_batch_page_says_it_expired_and_when(
    api: RunningApi,
    browser: Browser,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with api.client() as client:
        made = await client.post(
            "/v1/batches", json={"task": "echo", "items": [1, 2], "retention_s": 0}
        )
        batch_id = made.json()["id"]
        for _ in range(600):
            if (await client.get(f"/v1/batches/{batch_id}")).json().get("is_final"):
                break
            await asyncio.sleep(0.05)
    assert (await api.app.prune()).pruned == [batch_id]
    page, errors = await open_page(browser, f"{api.base_url}/#/batches/{batch_id}")
    card = page.get_by_test_id("expired")
    await expect(card).to_contain_text(f"Batch #{batch_id} has expired")
    await expect(card).to_contain_text("was pruned at")
    await expect(page.get_by_test_id("not-found")).to_have_count(0)
    await screenshot(page, tmp_path, "retention-expired.png")
    assert errors == []
