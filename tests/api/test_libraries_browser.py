"""The dashboard's library pages in a real browser: libraries, document states, search."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from playwright.async_api import Browser, expect

from pgbatch.workloads import vectors
from tests.api.conftest import RunningApi
from tests.api.test_dashboard_browser import browser, open_page, screenshot

__all__ = ["browser"]  # the fixture, imported so pytest finds it here


@pytest.fixture
def needs_pgvector(database_url: str) -> None:
    """Skip, saying why, on a server without pgvector."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    if not (row and row[0]):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_the_library_page_shows_documents_indexing_and_searches(
    api: RunningApi, browser: Browser, tmp_path: Path
) -> None:
    library = await vectors.create_library(api.app, tenant="default", name="papers")
    docs, batch = await vectors.add_documents(
        api.app,
        library.id,
        [
            vectors.DocumentIn(text="postgres vacuum freezes old tuples", metadata={"k": 1}),
            vectors.DocumentIn(chunks=["hnsw graph search", "ivfflat lists"]),
        ],
        tenant="default",
    )
    assert batch is not None
    page, errors = await open_page(browser, f"{api.base_url}/#/libraries")
    row = page.get_by_test_id("library-row")
    await expect(row).to_have_count(1)
    await expect(row.get_by_test_id("library-counts")).to_have_text("2 indexed")
    await row.get_by_role("link").click()
    await expect(page.get_by_test_id("library-view")).to_have_attribute("data-loaded", "true")
    statuses = page.get_by_test_id("document-status")
    await expect(statuses).to_have_text(["indexed", "indexed"])
    first = page.locator(f"[data-testid=document-row][data-id='{docs[0].id}']")
    await expect(first.get_by_role("link")).to_have_attribute("href", f"#/batches/{batch.id}")

    # A re-index: the page shows the new content version indexed (and its new batch).
    await vectors.reindex_documents(
        api.app, library.id, [docs[0].id], tenant="default",
        content=vectors.DocumentIn(text="rewritten text about vacuum"),
    )  # fmt: skip
    await page.reload()
    await expect(first).to_have_attribute("data-status", "indexed")
    await expect(first.locator("td").nth(3)).to_have_text("2 / 2")

    await page.get_by_test_id("search-text").fill("hnsw graph")
    await page.get_by_test_id("search-submit").click()
    hits = page.get_by_test_id("search-hit")
    await expect(hits.first).to_contain_text("hnsw graph search")
    shot = await screenshot(page, tmp_path, "library.png")
    print(f"screenshot: {shot}")
    assert errors == []
