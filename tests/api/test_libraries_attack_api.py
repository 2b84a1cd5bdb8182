"""Hostile and careless requests to /v1/libraries: each a 4xx naming its field, never a 500.

Found by attacking the workload over HTTP (imports, search bodies, If-Match, cursors,
an embedder out of rate budget); each test here failed before its fix.
"""

from __future__ import annotations

import httpx
import pytest

from pgbatch.workloads import vectors
from pgbatch.workloads.vectors.embedders import OpenAIEmbedder
from tests.api.conftest import RunningApi
from tests.api.test_libraries_api import needs_pgvector  # noqa: F401 (a fixture)


async def _library(client: httpx.AsyncClient, embedder: str = "hash-16") -> int:
    created = await client.post("/v1/libraries", json={"name": "attacked", "embedder": embedder})
    assert created.status_code == 201, created.text
    return int(created.json()["id"])


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_search_whose_embedder_has_no_rate_budget_is_503_with_retry_after(
    api: RunningApi,
) -> None:
    # The real OpenAI client, paused (as a 429 from its upstream pauses it) for longer
    # than it may wait: it gives up before sending anything. That is the server's
    # upstream being busy, not the client's text being wrong: not a 422 naming `text`.
    embedder = OpenAIEmbedder(
        base_url="http://127.0.0.1:9/v1", model="m", dimension=16, max_wait_s=0.0
    )
    vectors.embedders(api.app).register("budgetless", lambda: embedder)
    async with api.client() as client:
        library_id = await _library(client, "budgetless")
        await embedder.limits().pause("u", model="m", wait_s=30.0)
        found = await client.post(f"/v1/libraries/{library_id}/search", json={"text": "vacuum"})
    assert found.status_code == 503, found.text
    assert found.json()["error"]["code"] == "embedder_unavailable"
    assert 1 <= int(found.headers["Retry-After"]) <= 31
