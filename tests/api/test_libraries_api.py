"""/v1/libraries over HTTP: creation races, lost updates, If-Match, tenancy, search.

Races use true concurrency: one HTTP client (its own connection) per request, released
together by a barrier. Tests that need pgvector skip on a server without it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.api.conftest import RunningApi, StartApi
from tests.helpers import has_pgvector

RACERS = 32


@pytest.fixture
def needs_pgvector(database_url: str) -> None:
    """Skip, saying why, on a server without pgvector."""
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")


async def _together(api: RunningApi, send: Any, count: int = RACERS) -> list[httpx.Response]:
    """Send `count` requests at once, each from a client (a connection) of its own."""
    barrier = asyncio.Barrier(count)
    clients = [api.client() for _ in range(count)]

    async def one(client: httpx.AsyncClient) -> httpx.Response:
        async with client:
            # The connection is open before the barrier, so the requests leave together.
            await client.get("/v1/libraries")
            await barrier.wait()
            return await send(client)

    return await asyncio.gather(*(one(c) for c in clients))


async def _create(client: httpx.AsyncClient, name: str = "papers") -> httpx.Response:
    return await client.post("/v1/libraries", json={"name": name, "embedder": "hash-16"})


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_concurrent_creates_of_one_name_make_one_library(api: RunningApi) -> None:
    # A first library installs pgvector: its CREATE EXTENSION is serialised by a lock,
    # which would hide the race of the creates measured here.
    async with api.client() as client:
        assert (await _create(client, "warm-up")).status_code == 201
    answers = await _together(api, _create)
    assert Counter(a.status_code for a in answers) == {201: 1, 409: RACERS - 1}
    conflict = next(a for a in answers if a.status_code == 409).json()["error"]
    assert (conflict["code"], conflict["field"]) == ("library_exists", "name")
    async with api.client() as client:
        listed = (await client.get("/v1/libraries")).json()
    assert [x["name"] for x in listed["libraries"]] == ["warm-up", "papers"]


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_concurrent_patches_with_one_etag_make_one_change(api: RunningApi) -> None:
    async with api.client() as client:
        created = await _create(client)
        assert created.status_code == 201, created.text
        url = created.headers["Location"]
        etag = created.headers["ETag"]
        missing = await client.patch(url, json={"metadata": {"x": 1}})
        assert missing.status_code == 428 and missing.json()["error"]["field"] == "If-Match"

    async def patch(client: httpx.AsyncClient) -> httpx.Response:
        return await client.patch(
            url, json={"metadata": {"by": id(client)}}, headers={"If-Match": etag}
        )

    answers = await _together(api, patch)
    assert Counter(a.status_code for a in answers) == {200: 1, 412: RACERS - 1}
    [winner] = [a for a in answers if a.status_code == 200]
    async with api.client() as client:
        now = await client.get(url)
        assert now.json()["metadata"] == winner.json()["metadata"]
        assert now.headers["ETag"] == winner.headers["ETag"] == '"2"'
        stale = await client.delete(url, headers={"If-Match": etag})
        assert stale.status_code == 412 and stale.headers["ETag"] == '"2"'
        assert (await client.delete(url)).status_code == 428
        assert (await client.delete(url, headers={"If-Match": '"2"'})).status_code == 204
        assert (await client.get(url)).status_code == 404


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_documents_index_and_search_over_http(api: RunningApi) -> None:
    async with api.client() as client:
        library = (await _create(client)).json()
        base = f"/v1/libraries/{library['id']}"
        posted = await client.post(
            f"{base}/documents", json={"text": "vacuum freezes tuples", "metadata": {"k": "a"}}
        )
        assert posted.status_code == 201, posted.text
        doc = posted.json()
        bulk = await client.post(
            f"{base}/documents/bulk",
            json={"documents": [{"chunks": ["hnsw graph", "ivf lists"], "metadata": {"k": "b"}}]},
        )
        assert bulk.status_code == 201, bulk.text
        await api.app.wait(bulk.json()["batch_id"], timeout_s=30)
        await api.app.wait(doc["batch_id"], timeout_s=30)
        read = await client.get(f"{base}/documents/{doc['id']}")
        assert (
            read.json()["status"] == "indexed"
            and read.headers["ETag"] == f'"{read.json()["version"]}"'
        )
        chunks = (await client.get(f"{base}/documents/{doc['id']}/chunks")).json()
        assert [c["text"] for c in chunks["chunks"]] == ["vacuum freezes tuples"]
        found = await client.post(f"{base}/search", json={"text": "vacuum tuples", "k": 3})
        assert found.status_code == 200, found.text
        assert found.json()["hits"][0]["document_id"] == doc["id"]
        filtered = await client.post(
            f"{base}/search", json={"text": "vacuum", "k": 3, "filter": {"k": "b"}, "exact": True}
        )
        assert {h["metadata"]["k"] for h in filtered.json()["hits"]} == {"b"}
        wrong = await client.post(f"{base}/search", json={"vector": [1.0, 2.0], "k": 3})
        assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "vector"
        counts = (await client.get(base)).json()["documents"]
        assert counts == {"indexed": 2}
        patched = await client.patch(
            f"{base}/documents/{doc['id']}",
            json={"metadata": {"k": "c"}},
            headers={"If-Match": read.headers["ETag"]},
        )
        assert patched.status_code == 200, patched.text
        again = await client.post(f"{base}/documents/{doc['id']}/reindex", json={"text": "new"})
        assert again.status_code == 202 and again.json()["documents"][0]["content_version"] == 2


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_another_tenants_library_answers_404(start_api: StartApi) -> None:
    async with start_api(tenants=("acme", "globex")) as api:
        async with api.client("acme") as acme, api.client("globex") as globex:
            mine = await _create(acme)
            assert mine.status_code == 201
            url = mine.headers["Location"]
            # The same name is free for another tenant.
            assert (await _create(globex)).status_code == 201
            assert (await globex.get(url)).status_code == 404
            assert (await globex.post(f"{url}/documents", json={"text": "x"})).status_code == 404
            assert (await globex.post(f"{url}/search", json={"text": "x"})).status_code == 404
            gone = await globex.delete(url, headers={"If-Match": '"1"'})
            assert gone.status_code == 404
            assert [x["name"] for x in (await globex.get("/v1/libraries")).json()["libraries"]] == [
                "papers"
            ]
            assert (await acme.get(url)).status_code == 200


@pytest.mark.asyncio
async def test_without_pgvector_a_create_answers_409_naming_it(
    api: RunningApi, database_url: str
) -> None:
    if has_pgvector(database_url):
        pytest.skip("this server has pgvector: test_vectors simulates its absence instead")
    async with api.client() as client:
        answer = await _create(client)
        assert answer.status_code == 409
        assert answer.json()["error"]["code"] == "pgvector_missing"
        assert "pgvector" in answer.json()["error"]["message"]
        assert (await client.get("/v1/libraries")).json()["libraries"] == []


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_lists_are_cursor_pages(api: RunningApi) -> None:
    async with api.client() as client:
        for name in ("a", "b", "c"):
            assert (await _create(client, name)).status_code == 201
        first = (await client.get("/v1/libraries", params={"limit": 2})).json()
        assert [x["name"] for x in first["libraries"]] == ["a", "b"]
        second = (
            await client.get("/v1/libraries", params={"limit": 2, "cursor": first["next_cursor"]})
        ).json()
        assert [x["name"] for x in second["libraries"]] == ["c"] and second["next_cursor"] is None
        bad = await client.get("/v1/libraries", params={"cursor": "x"})
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "cursor"

        base = f"/v1/libraries/{first['libraries'][0]['id']}"
        posted = await client.post(
            f"{base}/documents/bulk", json={"documents": [{"text": f"d{n}"} for n in range(5)]}
        )
        await api.app.wait(posted.json()["batch_id"], timeout_s=30)
        page = (await client.get(f"{base}/documents", params={"limit": 3})).json()
        rest = (
            await client.get(f"{base}/documents", params={"cursor": page["next_cursor"]})
        ).json()
        ids = [d["id"] for d in page["documents"] + rest["documents"]]
        assert ids == sorted(ids) and len(ids) == 5
        indexed = (await client.get(f"{base}/documents", params={"status": "indexed"})).json()
        assert len(indexed["documents"]) == 5
        pending = (await client.get(f"{base}/documents", params={"status": "pending"})).json()
        assert pending["documents"] == []
