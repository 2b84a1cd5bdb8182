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


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_search_vector_of_extreme_values_finds_with_a_numeric_score(
    api: RunningApi,
) -> None:
    # pgvector computes in single precision: 1e300 was a 500 (out of range for `vector`),
    # 3e38 a NaN distance (the sums overflow) answered as score null, 1e-300 a vector
    # that vanishes to zero. Cosine ignores length: each is the direction [1, ..., 1].
    async with api.client() as client:
        library_id = await _library(client)
        posted = await client.post(
            f"/v1/libraries/{library_id}/documents", json={"text": "vacuum freezes tuples"}
        )
        assert posted.status_code == 201, posted.text
        assert (await api.app.wait(posted.json()["batch_id"], timeout_s=30)).status == "succeeded"
        scores = set()
        for value in (1.0, 3.0e38, -1e300, 1e-300):
            for exact in (True, False):
                found = await client.post(
                    f"/v1/libraries/{library_id}/search",
                    json={"vector": [value] * 16, "exact": exact},
                )
                assert found.status_code == 200, found.text
                [hit] = found.json()["hits"]
                assert isinstance(hit["score"], float), hit
                scores.add(round(abs(hit["score"]), 4))
        assert len(scores) == 1  # the same direction (or its opposite), the same distance
        zero = await client.post(f"/v1/libraries/{library_id}/search", json={"vector": [0.0] * 16})
        assert zero.status_code == 422 and zero.json()["error"]["field"] == "vector"
