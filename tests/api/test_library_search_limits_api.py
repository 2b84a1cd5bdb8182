"""Search bounds over HTTP: 429 past a tenant's exact-search cap, 503 past the timeout.

The concurrency of the cap itself (searches released together) is tested in
tests/integration/test_vector_search_limits.py; here the answers' shape: status, code,
field and Retry-After, and that another tenant and HNSW searches are not refused.
"""

from __future__ import annotations

import httpx
import psycopg
import pytest

from pgbatch.workloads import vectors
from tests.api.conftest import RunningApi, StartApi
from tests.api.test_libraries_api import needs_pgvector  # noqa: F401 (a fixture)


async def _indexed_library(api: RunningApi, client: httpx.AsyncClient) -> int:
    created = await client.post("/v1/libraries", json={"name": "lib", "embedder": "hash-16"})
    assert created.status_code == 201, created.text
    library_id = int(created.json()["id"])
    posted = await client.post(
        f"/v1/libraries/{library_id}/documents", json={"text": "vacuum freezes tuples"}
    )
    assert posted.status_code == 201, posted.text
    done = await api.app.wait(posted.json()["batch_id"], timeout_s=30)
    assert done.status == "succeeded"
    return library_id


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_exact_search_past_the_cap_is_429_and_a_slow_search_503(
    start_api: StartApi, database_url: str
) -> None:
    async with start_api(tenants=("acme", "globex")) as api:
        async with api.client("acme") as acme, api.client("globex") as globex:
            mine = await _indexed_library(api, acme)
            theirs = await _indexed_library(api, globex)
            search = {"text": "vacuum", "k": 1, "exact": True}
            vectors.set_search_limits(api.app, vectors.SearchLimits(exact_per_tenant=1))
            async with vectors.search_limits(api.app).slot("acme"):
                refused = await acme.post(f"/v1/libraries/{mine}/search", json=search)
                assert refused.status_code == 429, refused.text
                assert refused.headers["Retry-After"] == "1"
                error = refused.json()["error"]
                assert (error["code"], error["field"]) == ("too_many_searches", "exact")
                assert "PGBATCH_VECTORS_MAX_EXACT_PER_TENANT" in error["message"]
                hnsw = await acme.post(
                    f"/v1/libraries/{mine}/search", json=search | {"exact": False}
                )
                assert hnsw.status_code == 200, hnsw.text
                other = await globex.post(f"/v1/libraries/{theirs}/search", json=search)
                assert other.status_code == 200 and len(other.json()["hits"]) == 1

            vectors.set_search_limits(api.app, vectors.SearchLimits(statement_timeout_ms=200))
            async with await psycopg.AsyncConnection.connect(database_url) as lock:
                # The search waits on this lock (the app's lock timeout, 2 s, is longer):
                # the statement timeout ends it.
                await lock.execute(
                    f"LOCK TABLE pgbatch.vector_chunks_{mine} IN ACCESS EXCLUSIVE MODE"
                )
                for exact in (True, False):
                    slow = await acme.post(
                        f"/v1/libraries/{mine}/search", json=search | {"exact": exact}
                    )
                    assert slow.status_code == 503, slow.text
                    assert slow.json()["error"]["code"] == "search_timeout"
                    assert slow.headers["Retry-After"] == "1"
                await lock.rollback()
            assert (await acme.post(f"/v1/libraries/{mine}/search", json=search)).status_code == 200
