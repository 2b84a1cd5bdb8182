"""Hostile and careless requests to /v1/libraries: each a 4xx naming its field, never a 500.

Found by attacking the workload over HTTP (imports, search bodies, If-Match, cursors,
an embedder out of rate budget); each test here failed before its fix.
"""

from __future__ import annotations

import asyncio

import httpx
import orjson
import psycopg
import pytest

from pgbatch.workloads import vectors
from pgbatch.workloads.vectors.embedders import OpenAIEmbedder
from tests.api.conftest import RunningApi, StartApi
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


async def _wait_until_blocked(url: str, marker: str) -> None:
    """Return once a backend running a statement that contains `marker` waits on a lock."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as watcher:
        while True:
            cur = await watcher.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND datname = current_database() AND query LIKE %s",
                (f"%{marker}%",),
            )
            row = await cur.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.02)


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
@pytest.mark.parametrize("route", ["documents", "import"])
async def test_a_document_added_while_its_library_is_deleted_is_404_not_500(
    api: RunningApi, database_url: str, route: str
) -> None:
    # The add checks the library, then inserts; a delete committed in between made the
    # insert's foreign key fail: a 500. Here the deleter holds the library row while the
    # add passes its check and waits on that row in its INSERT (separate connections).
    async with api.client() as client:
        library_id = await _library(client)
        async with await psycopg.AsyncConnection.connect(database_url) as deleter:
            await deleter.execute(
                "SELECT 1 FROM pgbatch.vector_libraries WHERE id = %s FOR UPDATE", (library_id,)
            )
            if route == "documents":
                sent = client.post(f"/v1/libraries/{library_id}/documents", json={"text": "late"})
            else:
                sent = client.post(
                    f"/v1/libraries/{library_id}/documents/import",
                    content=b'{"text": "late"}\n' * 3,
                    headers={"content-type": "application/x-ndjson"},
                )
            add = asyncio.ensure_future(sent)
            await _wait_until_blocked(database_url, "INSERT INTO pgbatch.vector_documents")
            await deleter.execute(f"DROP TABLE pgbatch.vector_chunks_{library_id}")
            await deleter.execute(
                "DELETE FROM pgbatch.vector_libraries WHERE id = %s", (library_id,)
            )
            await deleter.commit()
            added = await add
        assert added.status_code == 404, added.text
        assert added.json()["error"]["code"] == "library_not_found"
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgbatch.vector_documents WHERE library_id = %s", (library_id,)
        )
        assert await cur.fetchone() == (0,)


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_an_import_holds_documents_to_the_limits_of_a_posted_one(api: RunningApi) -> None:
    # POST refuses a text or a chunk past 100,000 characters; the import took 1 MiB ones,
    # documents no other route would accept (nor re-index with that content).
    too_long = "a " * 50_000 + "b"
    async with api.client() as client:
        library_id = await _library(client)
        posted = await client.post(f"/v1/libraries/{library_id}/documents", json={"text": too_long})
        assert posted.status_code == 422, posted.text
        for line in ({"text": too_long}, {"chunks": ["ok", too_long]}):
            body = orjson.dumps({"text": "fine"}) + b"\n" + orjson.dumps(line) + b"\n"
            imported = await client.post(
                f"/v1/libraries/{library_id}/documents/import",
                content=body,
                headers={"content-type": "application/x-ndjson"},
            )
            assert imported.status_code == 422, imported.text
            error = imported.json()["error"]
            assert error["field"] == "body" and error["message"].startswith("line 2:"), error
            assert "100000" in error["message"], error
        listed = await client.get(f"/v1/libraries/{library_id}/documents")
        assert listed.json()["documents"] == []
        at_limit = orjson.dumps({"text": "a" * 100_000}) + b"\n"
        imported = await client.post(
            f"/v1/libraries/{library_id}/documents/import",
            content=at_limit,
            headers={"content-type": "application/x-ndjson"},
        )
        assert imported.status_code == 201, imported.text


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_bad_document_body_is_422_naming_its_own_field(api: RunningApi) -> None:
    # The one-document POST named `documents.0.text` (the bulk route's name) and re-index
    # `body.text`: fields neither body has.
    async with api.client() as client:
        library_id = await _library(client)
        base = f"/v1/libraries/{library_id}/documents"
        for body, field in (
            ({"text": "   "}, "text"),
            ({"chunks": ["ok", "  "]}, "chunks.1"),
            ({"text": "ok", "metadata": {"n": 2**64}}, "metadata"),
        ):
            posted = await client.post(base, json=body)
            assert posted.status_code == 422, posted.text
            assert posted.json()["error"]["field"] == field, posted.text
        bulk = await client.post(f"{base}/bulk", json={"documents": [{"text": "a"}, {"text": " "}]})
        assert bulk.status_code == 422 and bulk.json()["error"]["field"] == "documents.1.text"
        posted = await client.post(base, json={"text": "vacuum"})
        assert posted.status_code == 201, posted.text
        again = await client.post(f"{base}/{posted.json()['id']}/reindex", json={"text": "  "})
        assert again.status_code == 422 and again.json()["error"]["field"] == "text", again.text


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_blank_search_text_is_422_naming_text(api: RunningApi) -> None:
    # Blank text embeds to no feature at all (the local embedder's fixed fallback vector):
    # it answered hits that no query chose. Documents refuse blank text the same way.
    async with api.client() as client:
        library_id = await _library(client)
        posted = await client.post(f"/v1/libraries/{library_id}/documents", json={"text": "x"})
        assert (await api.app.wait(posted.json()["batch_id"], timeout_s=30)).status == "succeeded"
        for text in (" ", "\n\t "):
            found = await client.post(f"/v1/libraries/{library_id}/search", json={"text": text})
            assert found.status_code == 422, found.text
            assert found.json()["error"]["field"] == "text"


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_an_import_line_past_the_item_limit_is_413_naming_the_body(
    api: RunningApi,
) -> None:
    # The upload guard's refusal named `items` (POST /v1/batches' field): this route's
    # lines are documents of its body, as its 422s say.
    async with api.client() as client:
        library_id = await _library(client)
        body = b'{"text": "fine"}\n{"text": "' + b"a " * 600_000 + b'"}\n'
        imported = await client.post(
            f"/v1/libraries/{library_id}/documents/import",
            content=body,
            headers={"content-type": "application/x-ndjson"},
        )
        assert imported.status_code == 413, imported.text
        error = imported.json()["error"]
        assert (error["code"], error["field"]) == ("item_too_large", "body"), error
        assert error["message"].startswith("line 2:"), error
        listed = await client.get(f"/v1/libraries/{library_id}/documents")
        assert listed.json()["documents"] == []


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_an_import_past_the_item_count_is_413_too_many_items(start_api: StartApi) -> None:
    # It was a 422 invalid_request; POST /v1/batches answers the same limit 413
    # too_many_items, and the route's OpenAPI lists 413.
    async with start_api(api_max_items=3) as api, api.client() as client:
        library_id = await _library(client)
        url = f"/v1/libraries/{library_id}/documents/import"
        headers = {"content-type": "application/x-ndjson"}
        fits = await client.post(url, content=b'{"text": "a"}\n' * 3, headers=headers)
        assert fits.status_code == 201, fits.text
        over = await client.post(url, content=b'{"text": "a"}\n' * 4, headers=headers)
        assert over.status_code == 413, over.text
        error = over.json()["error"]
        assert (error["code"], error["field"]) == ("too_many_items", "body"), error
        assert error["message"].startswith("line 4:"), error
        listed = await client.get(f"/v1/libraries/{library_id}/documents")
        assert len(listed.json()["documents"]) == 3


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_reindex_with_if_match_star_reindexes_any_version(api: RunningApi) -> None:
    # If-Match is optional on re-index, and `*` matches any current version (RFC 9110, and
    # POST /v1/batches/{id}/cancel takes it so): it was a 412 "not an ETag".
    async with api.client() as client:
        library_id = await _library(client)
        posted = await client.post(f"/v1/libraries/{library_id}/documents", json={"text": "a"})
        url = f"/v1/libraries/{library_id}/documents/{posted.json()['id']}"
        again = await client.post(f"{url}/reindex", json={}, headers={"If-Match": "*"})
        assert again.status_code == 202, again.text
        assert again.json()["documents"][0]["content_version"] == 2
        missing = await client.post(
            f"/v1/libraries/{library_id}/documents/999999/reindex",
            json={},
            headers={"If-Match": "*"},
        )
        assert missing.status_code == 404, missing.text
