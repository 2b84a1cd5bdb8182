"""One library's delete against everything else, and a document's delete against indexing.

A library's chunk table has no foreign key to `pgbatch.vector_documents`: dropping a
table that has one takes ACCESS EXCLUSIVE on the table it references, so a library
delete held every document of every library of every tenant until it committed. Here a
tenant's library delete is held open after its DROP while another tenant works on its
own libraries on other connections, with a short lock_timeout: a wait fails fast, with
no timing assertion. The chunks the foreign key deleted are now deleted by the workload:
a document's delete, raced against an indexing commit on separate connections released
together, leaves no orphan chunk. They need pgvector (a chunk table has a vector column).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
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
# Long enough for the brief row locks tenant B's own requests may take of one another on
# a loaded machine, and far shorter than tenant A's delete is held (until B is done):
# a request that waits for A fails with LockNotAvailable instead of finishing.
B_LOCK_TIMEOUT_MS = 1_000
RACE_ROUNDS = 12


@pytest_asyncio.fixture
async def vapp(database_url: str) -> AsyncIterator[pgbatch.App]:
    """An open App using the vectors workload, on a server with pgvector (else skip)."""
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")
    # A transaction held open by a test outlives the default idle-in-transaction timeout.
    app = pgbatch.App(
        settings=settings_for(database_url, session_idle_in_transaction_timeout_ms=120_000)
    )
    app.use(vectors.WORKLOAD)
    await app.open()
    yield app
    await app.close()


def _vector(value: float) -> str:
    return "[" + ",".join([str(value)] * DIM) + "]"


def _commit_statement(library_id: int, docs: Sequence[vectors.DocumentRecord]) -> CommitStatement:
    """The statement an indexing shard of these documents queues: two chunks each."""
    return vector_queries.index_commit_statement(
        library_id,
        [d.id for d in docs],
        [d.content_version for d in docs],
        [(d.id, seq, f"chunk {seq} of {d.id}", _vector(0.5 + seq)) for d in docs for seq in (0, 1)],
    )


async def _run_commit(url: str, statement: CommitStatement) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(statement.statement, statement.params)
        row = await cur.fetchone()
        await conn.commit()
    assert row is not None
    return int(row[0])


async def _indexed_library(
    app: pgbatch.App, tenant: str, name: str, documents: int = 3
) -> tuple[vectors.LibraryRecord, list[vectors.DocumentRecord]]:
    """A library of `documents` documents, indexed (two chunks each) without a worker."""
    library = await vectors.create_library(app, tenant=tenant, name=name, embedder=f"hash-{DIM}")
    docs, _ = await vectors.add_documents(
        app,
        library.id,
        [vectors.DocumentIn(text=f"doc {n}", metadata={"n": n}) for n in range(documents)],
        tenant=tenant,
    )
    url = app.settings.database_url or ""
    assert await _run_commit(url, _commit_statement(library.id, docs)) == len(docs)
    fresh = [await vectors.get_document(app, library.id, d.id, tenant=tenant) for d in docs]
    return library, fresh


async def _scalar(app: pgbatch.App, sql: str, params: Any = None) -> Any:
    async with app.db.connection() as conn:
        cur = await conn.execute(sql, params)
        row = await cur.fetchone()
    assert row is not None
    return row[0]


async def _orphan_chunks(app: pgbatch.App, library_id: int) -> int:
    table = vector_queries.chunks_table(library_id)
    return int(
        await _scalar(
            app,
            f"SELECT count(*) FROM pgbatch.{table} c WHERE NOT EXISTS"
            " (SELECT 1 FROM pgbatch.vector_documents d WHERE d.id = c.document_id)",
        )
    )


async def _chunk_count(app: pgbatch.App, library_id: int, document_id: int) -> int:
    table = vector_queries.chunks_table(library_id)
    return int(
        await _scalar(
            app, f"SELECT count(*) FROM pgbatch.{table} WHERE document_id = %s", (document_id,)
        )
    )


async def _waiting_for_a_lock(app: pgbatch.App, pid: int) -> bool:
    return bool(
        await _scalar(
            app,
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s AND wait_event_type = 'Lock'",
            (pid,),
        )
    )


def _held_after(
    monkeypatch: pytest.MonkeyPatch, step_name: str, held_pids: list[int] | None = None
) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the first call of query step `step_name` hold its transaction open once run.

    The held session's backend pid is appended to `held_pids`.
    """
    held_pids = [] if held_pids is None else held_pids
    reached, resume = asyncio.Event(), asyncio.Event()
    step: Callable[..., Awaitable[Any]] = getattr(vector_queries, step_name)

    async def step_then_hold(*args: Any, **kwargs: Any) -> Any:
        result = await step(*args, **kwargs)
        if not reached.is_set():  # later calls (another tenant's) run through
            held_pids.append(args[0].info.backend_pid)
            reached.set()
            await resume.wait()
        return result

    monkeypatch.setattr(vector_queries, step_name, step_then_hold)
    return reached, resume


@pytest.mark.asyncio
async def test_deleting_a_document_deletes_its_chunks_in_its_transaction(
    vapp: pgbatch.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    library, docs = await _indexed_library(vapp, "t", "one-doc-delete")
    gone, kept = docs[0], docs[1]
    assert await _chunk_count(vapp, library.id, gone.id) == 2
    reached, resume = _held_after(monkeypatch, "delete_document_chunks")
    deleting = asyncio.create_task(
        vectors.delete_document(vapp, library.id, gone.id, tenant="t", version=gone.version)
    )
    await asyncio.wait_for(reached.wait(), 30)
    # Both statements have run and nothing is committed: another session sees it all.
    assert await _chunk_count(vapp, library.id, gone.id) == 2
    resume.set()
    await asyncio.wait_for(deleting, 30)
    assert await _chunk_count(vapp, library.id, gone.id) == 0
    assert await _chunk_count(vapp, library.id, kept.id) == 2
    hits = await vectors.search(vapp, library.id, tenant="t", vector=[1.0] * DIM, k=10)
    assert {hit.document_id for hit in hits} == {d.id for d in docs[1:]}


@pytest.mark.asyncio
async def test_a_document_delete_racing_an_indexing_commit_leaves_no_orphan_chunk(
    vapp: pgbatch.App,
) -> None:
    # Each round: a pending document; its delete (at the version the client read) and
    # the indexing commit of that version start on two connections released together.
    # Either the delete wins (the commit finds no document and writes no chunk) or the
    # commit does (its version bump makes the delete stale: 412, document and chunks
    # stay). Never a chunk without its document.
    library = await vectors.create_library(vapp, tenant="t", name="race", embedder=f"hash-{DIM}")
    url = vapp.settings.database_url or ""
    for n in range(RACE_ROUNDS):
        (doc,), _ = await vectors.add_documents(
            vapp, library.id, [vectors.DocumentIn(text=f"doc {n}")], tenant="t"
        )
        statement = _commit_statement(library.id, [doc])
        barrier = asyncio.Barrier(2)

        async def delete(
            doc: vectors.DocumentRecord = doc, barrier: asyncio.Barrier = barrier
        ) -> str:
            await barrier.wait()
            try:
                await vectors.delete_document(
                    vapp, library.id, doc.id, tenant="t", version=doc.version
                )
            except vectors.VersionMismatchError:
                return "stale"
            return "deleted"

        async def commit(
            statement: CommitStatement = statement, barrier: asyncio.Barrier = barrier
        ) -> int:
            async with await psycopg.AsyncConnection.connect(url) as conn:
                await conn.execute("SELECT 1")  # connected before the release
                await barrier.wait()
                cur = await conn.execute(statement.statement, statement.params)
                row = await cur.fetchone()
                await conn.commit()
            assert row is not None
            return int(row[0])

        deleted, written = await asyncio.wait_for(asyncio.gather(delete(), commit()), 60)
        chunks = await _chunk_count(vapp, library.id, doc.id)
        assert (deleted, written, chunks) in {("deleted", 0, 0), ("stale", 1, 2)}
    assert await _orphan_chunks(vapp, library.id) == 0


@pytest.mark.asyncio
async def test_a_commit_meeting_a_document_delete_midway_writes_no_chunk(
    vapp: pgbatch.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interleaving the race above may not hit: the delete has deleted the document
    # row and its (still empty) chunks, and is held open; the commit of that document
    # must wait for the row and then write nothing, or its chunks would outlive it.
    library = await vectors.create_library(vapp, tenant="t", name="held", embedder=f"hash-{DIM}")
    docs, _ = await vectors.add_documents(
        vapp, library.id, [vectors.DocumentIn(text=f"doc {n}") for n in range(2)], tenant="t"
    )
    gone = docs[0]
    reached, resume = _held_after(monkeypatch, "delete_document_chunks")
    deleting = asyncio.create_task(
        vectors.delete_document(vapp, library.id, gone.id, tenant="t", version=gone.version)
    )
    await asyncio.wait_for(reached.wait(), 30)
    url = vapp.settings.database_url or ""
    statement = _commit_statement(library.id, docs)
    async with await psycopg.AsyncConnection.connect(url) as committer:
        pid = committer.info.backend_pid

        async def commit() -> int:
            cur = await committer.execute(statement.statement, statement.params)
            row = await cur.fetchone()
            await committer.commit()
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
    assert not ended_early, "the commit did not wait for the document being deleted"
    assert written == 1  # the other document only
    assert await _chunk_count(vapp, library.id, gone.id) == 0
    assert await _chunk_count(vapp, library.id, docs[1].id) == 2
    assert await _orphan_chunks(vapp, library.id) == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("held_after", ["drop_chunks_table", "delete_library"])
async def test_a_tenants_library_delete_held_open_blocks_no_other_tenant(
    vapp: pgbatch.App, monkeypatch: pytest.MonkeyPatch, held_after: str
) -> None:
    # Tenant A's library delete is held open after its DROP TABLE (and, second case, also
    # after the row delete whose cascade deletes A's documents). Meanwhile tenant B, on
    # an app of its own whose sessions wait at most B_LOCK_TIMEOUT_MS for any lock, reads,
    # lists, patches, searches, adds and deletes documents of its library, creates a
    # library and deletes another, all at once on separate connections. Every request
    # completes: none waits on A's locks (one that did would fail with LockNotAvailable).
    url = vapp.settings.database_url or ""
    library_a, _ = await _indexed_library(vapp, "tenant-a", "a-doomed")
    library_b, docs_b = await _indexed_library(vapp, "tenant-b", "b-busy", documents=4)
    other_b = await vectors.create_library(
        vapp, tenant="tenant-b", name="b-other", embedder=f"hash-{DIM}"
    )
    b_app = pgbatch.App(settings=settings_for(url, session_lock_timeout_ms=B_LOCK_TIMEOUT_MS))
    b_app.use(vectors.WORKLOAD)
    await b_app.open()
    try:
        chunks_oid = await _scalar(
            vapp,
            "SELECT %s::regclass::oid",
            (f"pgbatch.{vector_queries.chunks_table(library_a.id)}",),
        )
        held_pids: list[int] = []
        reached, resume = _held_after(monkeypatch, held_after, held_pids)
        deleting = asyncio.create_task(
            vectors.delete_library(vapp, library_a.id, tenant="tenant-a", version=library_a.version)
        )
        await asyncio.wait_for(reached.wait(), 30)
        b = "tenant-b"
        requests: dict[str, Callable[[], Awaitable[Any]]] = {
            "get": lambda: vectors.get_document(b_app, library_b.id, docs_b[0].id, tenant=b),
            "list": lambda: vectors.list_documents(b_app, library_b.id, tenant=b),
            "counts": lambda: vectors.status_counts(b_app, library_b.id, tenant=b),
            "patch": lambda: vectors.update_document(
                b_app, library_b.id, docs_b[1].id, tenant=b,
                version=docs_b[1].version, metadata={"patched": True},
            ),
            "search": lambda: vectors.search(
                b_app, library_b.id, tenant=b, vector=[1.0] * DIM, k=5
            ),
            "exact search": lambda: vectors.search(
                b_app, library_b.id, tenant=b, vector=[1.0] * DIM, k=5, exact=True
            ),
            "chunks": lambda: vectors.list_chunks(b_app, library_b.id, docs_b[0].id, tenant=b),
            "add": lambda: vectors.add_documents(
                b_app, library_b.id, [vectors.DocumentIn(text="added")], tenant=b
            ),
            "delete document": lambda: vectors.delete_document(
                b_app, library_b.id, docs_b[2].id, tenant=b, version=docs_b[2].version
            ),
            "create library": lambda: vectors.create_library(
                b_app, tenant=b, name="b-new", embedder=f"hash-{DIM}"
            ),
            "delete library": lambda: vectors.delete_library(
                b_app, other_b.id, tenant=b, version=other_b.version
            ),
        }  # fmt: skip
        barrier = asyncio.Barrier(len(requests))

        async def released_together(request: Callable[[], Awaitable[Any]]) -> Any:
            await barrier.wait()
            return await request()

        try:
            # The held delete's table locks: beyond its own chunk table (and that table's
            # index, key and TOAST), none stronger than the row-level writers' ROW EXCLUSIVE.
            async with vapp.db.connection() as conn:
                cur = await conn.execute(
                    "SELECT DISTINCT coalesce(c.relname, l.relation::text), l.mode FROM pg_locks l"
                    " LEFT JOIN pg_class c ON c.oid = l.relation"
                    " WHERE l.pid = %s AND l.locktype = 'relation' AND l.granted"
                    " AND l.mode NOT IN ('AccessShareLock', 'RowShareLock', 'RowExclusiveLock')",
                    (held_pids[0],),
                )
                strong = {(name, mode) for name, mode in await cur.fetchall()}
            results = await asyncio.wait_for(
                asyncio.gather(
                    *(released_together(r) for r in requests.values()), return_exceptions=True
                ),
                60,
            )
        finally:
            resume.set()
            await asyncio.wait_for(deleting, 30)
        own = (vector_queries.chunks_table(library_a.id), f"pg_toast_{chunks_oid}")
        assert {name for name, _ in strong if not name.startswith(own)} == set(), strong
        assert (own[0], "AccessExclusiveLock") in strong  # the DROP is indeed held
        failed = {
            name: repr(result)
            for name, result in zip(requests, results, strict=True)
            if isinstance(result, BaseException)
        }
        assert failed == {}, f"tenant B's requests waited on tenant A's delete: {failed}"
        done = dict(zip(requests, results, strict=True))
        assert done["get"].id == docs_b[0].id
        assert docs_b[0].id in {d.id for d in done["list"]}
        assert done["patch"].metadata == {"patched": True}
        assert {hit.document_id for hit in done["search"]} <= {d.id for d in docs_b}
        assert len(done["search"]) == 5 and len(done["exact search"]) == 5
        assert [c.seq for c in done["chunks"]] == [0, 1]
    finally:
        await b_app.close()
    assert not deleting.exception()
    left = await _scalar(
        vapp,
        "SELECT (SELECT count(*) FROM pgbatch.vector_documents WHERE library_id = %(a)s)"
        " + (SELECT count(*) FROM pgbatch.vector_libraries WHERE id = %(a)s)"
        " + (to_regclass(%(table)s) IS NOT NULL)::int",
        {"a": library_a.id, "table": f"pgbatch.{vector_queries.chunks_table(library_a.id)}"},
    )
    assert left == 0  # A's library went with nothing left: documents, row, chunk table
    assert await _chunk_count(vapp, library_b.id, docs_b[2].id) == 0
    assert await _orphan_chunks(vapp, library_b.id) == 0


@pytest.mark.asyncio
async def test_a_document_delete_meeting_a_library_delete_midway_waits_and_finds_nothing(
    vapp: pgbatch.App, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The library delete is held after its DROP TABLE; a delete of one of its documents
    # starts then. Its FOR KEY SHARE on the library row makes it wait for the library
    # delete and then find no document: no deadlock, nothing retried, nothing left.
    # Without it the document delete removes its row, then waits on the dropped chunk
    # table, while the library delete's cascade waits on that row: a deadlock.
    library, docs = await _indexed_library(vapp, "t", "doc-meets-library")
    reached, resume = _held_after(monkeypatch, "drop_chunks_table")
    retries_before = vapp.db.tx_retries
    deleting_library = asyncio.create_task(
        vectors.delete_library(vapp, library.id, tenant="t", version=library.version)
    )
    await asyncio.wait_for(reached.wait(), 30)
    deleting_document = asyncio.create_task(
        vectors.delete_document(vapp, library.id, docs[0].id, tenant="t", version=docs[0].version)
    )

    async def waits_or_ended() -> bool:
        if deleting_document.done():
            return True
        return bool(
            await _scalar(
                vapp,
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database()",
            )
        )

    await wait_until(waits_or_ended, timeout_s=30)
    ended_early = deleting_document.done()
    resume.set()
    await asyncio.wait_for(deleting_library, 30)
    with pytest.raises((vectors.DocumentNotFoundError, vectors.LibraryNotFoundError)):
        await asyncio.wait_for(deleting_document, 30)
    assert not ended_early, "the document delete did not wait for the library delete"
    assert vapp.db.tx_retries == retries_before  # no deadlock, nothing retried
    left = await _scalar(
        vapp,
        "SELECT (SELECT count(*) FROM pgbatch.vector_documents WHERE library_id = %(a)s)"
        " + (to_regclass(%(table)s) IS NOT NULL)::int",
        {"a": library.id, "table": f"pgbatch.{vector_queries.chunks_table(library.id)}"},
    )
    assert left == 0
