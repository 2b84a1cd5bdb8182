"""A library's documents over HTTP under concurrency: lost updates and a forced deadlock.

Races use true concurrency: one HTTP client (its own connection) per request, released
together by a barrier. They need pgvector (a library needs it) and skip without it.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import httpx
import psycopg
import pytest

from tests.api.conftest import RunningApi
from tests.helpers import has_pgvector, wait_until

RACERS = 32


@pytest.fixture
def needs_pgvector(database_url: str) -> None:
    """Skip, saying why, on a server without pgvector."""
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")


async def _library_with_a_document(client: httpx.AsyncClient) -> tuple[str, dict[str, Any]]:
    created = await client.post("/v1/libraries", json={"name": "docs", "embedder": "hash-16"})
    assert created.status_code == 201, created.text
    base = created.headers["Location"]
    posted = await client.post(f"{base}/documents", json={"text": "a", "metadata": {"n": 0}})
    assert posted.status_code == 201, posted.text
    return base, posted.json()


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_concurrent_document_patches_with_one_etag_make_one_change(
    api: RunningApi,
) -> None:
    async with api.client() as client:
        base, doc = await _library_with_a_document(client)
        url = f"{base}/documents/{doc['id']}"
        await api.app.wait(doc["batch_id"], timeout_s=30)  # no indexing moves the version
        read = await client.get(url)
        etag = read.headers["ETag"]
        missing = await client.patch(url, json={"metadata": {"n": -1}})
        assert missing.status_code == 428 and missing.json()["error"]["field"] == "If-Match"

    barrier = asyncio.Barrier(RACERS)

    async def patch(n: int) -> httpx.Response:
        async with api.client() as racer:
            await racer.get(url)  # the connection is open before the barrier
            await barrier.wait()
            return await racer.patch(url, json={"metadata": {"n": n}}, headers={"If-Match": etag})

    answers = await asyncio.gather(*(patch(n) for n in range(1, RACERS + 1)))
    assert Counter(a.status_code for a in answers) == {200: 1, 412: RACERS - 1}
    [winner] = [a for a in answers if a.status_code == 200]
    stale = next(a for a in answers if a.status_code == 412)
    assert stale.json()["error"]["field"] == "If-Match"
    assert stale.headers["ETag"] == winner.headers["ETag"]
    async with api.client() as client:
        now = await client.get(url)
    assert now.json()["metadata"] == winner.json()["metadata"]
    assert now.headers["ETag"] == winner.headers["ETag"]


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_library_delete_in_a_forced_deadlock_is_retried_and_answers_204(
    api: RunningApi,
) -> None:
    # The opponent locks the document, then the library row: the opposite of a library
    # delete (library row, then the documents by cascade). Its deadlock_timeout is long,
    # so the delete (1 s) detects the cycle and is aborted; the API retries it with
    # backoff once the opponent has committed: both succeed, and no answer is a 500.
    async with api.client() as client:
        base, doc = await _library_with_a_document(client)
        await api.app.wait(doc["batch_id"], timeout_s=30)
        library = await client.get(base)
        library_id = library.json()["id"]
        retries_before = api.app.db.tx_retries
        url = api.app.settings.database_url or ""
        async with await psycopg.AsyncConnection.connect(url) as other:
            await other.execute("SET deadlock_timeout = '20s'")
            await other.execute(
                'UPDATE pgbatch.vector_documents SET metadata = \'{"by": "other"}\' WHERE id = %s',
                (doc["id"],),
            )
            deleting = asyncio.create_task(
                client.delete(base, headers={"If-Match": library.headers["ETag"]})
            )

            async def delete_waits_for_a_lock() -> bool:
                cur = await other.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
                )
                row = await cur.fetchone()
                return bool(row and row[0])

            await wait_until(delete_waits_for_a_lock, timeout_s=30)
            await other.execute(
                "UPDATE pgbatch.vector_libraries SET updated_at = now() WHERE id = %s",
                (library_id,),
            )
            await other.commit()
            deleted = await asyncio.wait_for(deleting, 60)
        assert deleted.status_code == 204, deleted.text
        assert api.app.db.tx_retries > retries_before
        assert (await client.get(base)).status_code == 404
