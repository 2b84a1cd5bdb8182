"""The indexing commit against a library delete, overlapping on two connections.

`pgbatch.vector_index_commit` locks the library row FOR SHARE before it touches the
documents or the chunk table, and a library delete locks it FOR UPDATE before it drops
the chunk table and deletes the row (whose cascade deletes the documents). So the two
are ordered by the library row: a delete in flight makes the commit wait and then find
no library (it writes nothing), and a commit in flight makes the delete wait for it.
Both orders are driven here with the transactions really open at once, on separate
connections. They need pgvector (a library's chunk table has a vector column).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
import pytest
import pytest_asyncio

import pgbatch
from pgbatch.db.shards import CommitStatement
from pgbatch.workloads import vectors
from pgbatch.workloads.vectors import queries as vector_queries
from tests.conftest import settings_for
from tests.helpers import has_pgvector, wait_until

DIM = 8
TENANT = "t"


@pytest_asyncio.fixture
async def vapp(database_url: str) -> AsyncIterator[pgbatch.App]:
    """An open App using the vectors workload, on a server with pgvector (else skip)."""
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")
    app = pgbatch.App(settings=settings_for(database_url))
    app.use(vectors.WORKLOAD)
    await app.open()
    yield app
    await app.close()


async def _library_with_documents(
    app: pgbatch.App, name: str
) -> tuple[vectors.LibraryRecord, list[vectors.DocumentRecord]]:
    library = await vectors.create_library(app, tenant=TENANT, name=name, embedder=f"hash-{DIM}")
    # No worker runs: the documents stay pending at content version 1, and the commit
    # statement below is what an indexing shard of theirs would queue.
    docs, _ = await vectors.add_documents(
        app, library.id, [vectors.DocumentIn(text=f"doc {n}") for n in range(3)], tenant=TENANT
    )
    return library, docs


def _commit_statement(library_id: int, docs: Sequence[vectors.DocumentRecord]) -> CommitStatement:
    vector = "[" + ",".join(["0.5"] * DIM) + "]"
    return vector_queries.index_commit_statement(
        library_id,
        [d.id for d in docs],
        [d.content_version for d in docs],
        [(d.id, 0, f"chunk of {d.id}", vector) for d in docs],
    )


async def _waiting_for_a_lock(app: pgbatch.App, pid: int | None = None) -> bool:
    """Tell whether backend `pid` (or any backend of this database) waits on a lock."""
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND (%(pid)s::int IS NULL OR pid = %(pid)s::int)",
            {"pid": pid},
        )
        row = await cur.fetchone()
    return bool(row and row[0])


async def _left_behind(app: pgbatch.App, library_id: int) -> tuple[Any, ...]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM pgbatch.vector_documents WHERE library_id = %(id)s),"
            " (SELECT count(*) FROM pgbatch.vector_libraries WHERE id = %(id)s),"
            " to_regclass(%(table)s)",
            {"id": library_id, "table": f"pgbatch.{vector_queries.chunks_table(library_id)}"},
        )
        row = await cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.asyncio
@pytest.mark.parametrize("held_after", ["lock_library", "drop_chunks_table"])
async def test_a_commit_meeting_a_delete_midway_waits_for_it_and_writes_nothing(
    vapp: pgbatch.App, monkeypatch: pytest.MonkeyPatch, held_after: str
) -> None:
    # The delete is held open after one of its steps: once it has locked the library
    # row, or also dropped the chunk table (the deletion of the row, whose cascade
    # deletes the documents, comes next). The commit must wait for it, then find the
    # library gone and write nothing. After the row lock only the commit's FOR SHARE
    # makes it wait: without it the commit writes its chunks into the library being
    # deleted (seen: it returned 3, without waiting). After the drop, too, the FOR SHARE
    # makes it wait at the library row: since vectors 0003 a chunk table has no foreign
    # key to vector_documents, so DROP TABLE no longer locks that table as well.
    library, docs = await _library_with_documents(vapp, f"share-{held_after}")
    statement = _commit_statement(library.id, docs)
    reached, resume = asyncio.Event(), asyncio.Event()
    step = getattr(vector_queries, held_after)

    async def step_then_hold(*args: Any) -> Any:
        result = await step(*args)
        reached.set()
        await resume.wait()
        return result

    monkeypatch.setattr(vector_queries, held_after, step_then_hold)
    retries_before = vapp.db.tx_retries
    deleting = asyncio.create_task(
        vectors.delete_library(vapp, library.id, tenant=TENANT, version=library.version)
    )
    await asyncio.wait_for(reached.wait(), 30)
    url = vapp.settings.database_url or ""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as committer:
        pid = committer.info.backend_pid

        async def commit() -> int:
            async with committer.transaction():
                cur = await committer.execute(statement.statement, statement.params)
                row = await cur.fetchone()
            assert row is not None
            return int(row[0])

        committing = asyncio.create_task(commit())

        async def waits_or_ended() -> bool:
            return committing.done() or await _waiting_for_a_lock(vapp, pid)

        await wait_until(waits_or_ended, timeout_s=30)
        ended_early = committing.done()
        resume.set()
        await asyncio.wait_for(deleting, 30)
        written = await asyncio.wait_for(committing, 30)
    assert not ended_early, f"the commit did not wait for the delete (wrote {written})"
    assert written == 0  # the library was gone when the commit got its row
    assert vapp.db.tx_retries == retries_before  # no deadlock, nothing retried
    assert await _left_behind(vapp, library.id) == (0, 0, None)


@pytest.mark.asyncio
async def test_a_delete_meeting_an_open_commit_waits_for_it_without_stalling_searches(
    vapp: pgbatch.App,
) -> None:
    # The commit has run and its transaction is still open (as in a shard's completion
    # transaction); the delete must wait for it, then delete the documents and chunks it
    # wrote. With the commit's FOR SHARE the delete waits at the library row, holding no
    # table lock, so searches of the library go on meanwhile. Without it the delete
    # waits in DROP TABLE, whose queued ACCESS EXCLUSIVE request stops every reader of
    # the chunk table behind it (seen: the search waited on a lock; a plain read of the
    # chunk table waited until the session's lock_timeout cancelled the delete).
    library, docs = await _library_with_documents(vapp, "share-open")
    statement = _commit_statement(library.id, docs)
    url = vapp.settings.database_url or ""
    retries_before = vapp.db.tx_retries
    async with await psycopg.AsyncConnection.connect(url) as committer:
        cur = await committer.execute(statement.statement, statement.params)
        row = await cur.fetchone()
        assert row is not None and row[0] == len(docs)
        deleting = asyncio.create_task(
            vectors.delete_library(vapp, library.id, tenant=TENANT, version=library.version)
        )
        await wait_until(lambda: _waiting_for_a_lock(vapp), timeout_s=30)
        assert not deleting.done()
        searching = asyncio.create_task(
            vectors.search(vapp, library.id, tenant=TENANT, vector=[1.0] * DIM, k=5)
        )

        async def search_ended_or_waits() -> bool:
            if searching.done():
                return True
            async with vapp.db.connection() as conn:
                cur = await conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event_type = 'Lock'"
                )
                waiting = await cur.fetchone()
            return bool(waiting and waiting[0] >= 2)  # the delete's and the search's

        await wait_until(search_ended_or_waits, timeout_s=30)
        search_stalled = not searching.done()
        await committer.commit()
        await asyncio.wait_for(deleting, 30)
        with contextlib.suppress(vectors.LibraryNotFoundError):
            await asyncio.wait_for(searching, 30)
    assert not search_stalled, "a search of the library queued behind the waiting delete"
    assert searching.result() == []  # the commit's chunks were not committed yet
    assert vapp.db.tx_retries == retries_before
    assert await _left_behind(vapp, library.id) == (0, 0, None)
