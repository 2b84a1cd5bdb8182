"""/docs and /redoc load every script and style from this server, none from a CDN."""

from __future__ import annotations

import re

import pytest

from tests.api.conftest import RunningApi

# src= and href= of the page's scripts, styles and icons.
ASSET_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")
# Swagger UI's and ReDoc's bundles are megabytes; a stub or an error page is not.
MIN_BUNDLE_BYTES = 100_000


@pytest.mark.asyncio
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_the_reference_pages_use_only_local_assets(api: RunningApi, page: str) -> None:
    async with api.client() as client:
        html = await client.get(page)
        assert html.status_code == 200, html.text
        urls = ASSET_URL.findall(html.text)
        assert urls, html.text
        for url in urls:
            assert url.startswith("/"), f"{page} loads {url} from elsewhere"
            asset = await client.get(url)
            assert asset.status_code == 200, url
            if url.endswith(".js"):
                assert len(asset.content) > MIN_BUNDLE_BYTES, url
        assert "'/openapi.json'" in html.text or '"/openapi.json"' in html.text
