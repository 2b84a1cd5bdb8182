"""/docs and /redoc render in a real browser that can reach nothing but this server."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest
from playwright.async_api import Browser, Page, Route, expect

from tests.api.conftest import RunningApi
from tests.api.test_dashboard_browser import browser, open_page

__all__ = ["browser"]  # the fixture, imported for pytest

# Swagger UI and ReDoc lay out the whole OpenAPI document in the page's JavaScript: CPU
# work, not a wait on events, 5-15 s on a loaded 2-core machine. ReDoc still showed
# "Loading ..." after the dashboard tests' 10 s with the suite's other worker beside it.
RENDER_TIMEOUT_MS = 60_000


async def _offline(page: Page, base_url: str) -> list[str]:
    """Refuse every request not to the API under test (as without internet); return them."""
    refused: list[str] = []
    own = urlsplit(base_url).netloc

    async def only_local(route: Route) -> None:
        if urlsplit(route.request.url).netloc == own:
            await route.continue_()
        else:
            refused.append(route.request.url)
            await route.abort()

    await page.route("**/*", only_local)
    return refused


@pytest.mark.asyncio
async def test_swagger_ui_renders_the_operations_offline(api: RunningApi, browser: Browser) -> None:
    page, errors = await open_page(browser, "about:blank")
    refused = await _offline(page, api.base_url)
    await page.goto(f"{api.base_url}/docs")
    cancel = page.locator('.opblock-summary-path[data-path="/v1/batches/{batch_id}/cancel"]')
    await expect(cancel).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    assert refused == [] and errors == []


@pytest.mark.asyncio
async def test_redoc_renders_offline(api: RunningApi, browser: Browser) -> None:
    page, errors = await open_page(browser, "about:blank")
    refused = await _offline(page, api.base_url)
    await page.goto(f"{api.base_url}/redoc")
    heading = page.get_by_role("heading", name="pgbatch")
    await expect(heading).to_be_visible(timeout=RENDER_TIMEOUT_MS)
    # ReDoc's sidebar footer may ask its CDN for a logo once rendered; offline the image
    # fails and ReDoc drops it (its onError renders nothing). Nothing else may leave.
    refused = [url for url in refused if url != "https://cdn.redoc.ly/redoc/logo-mini.svg"]
    assert refused == [] and errors == []
