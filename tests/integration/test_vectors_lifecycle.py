"""A document's processing state always ends, and an NDJSON import is one batch, whole.

Issue 11's "a document's processing state": a document whose indexing shard died, whose
batch was cancelled or pruned, ends `failed` or `cancelled` with the reason (settled
by the batch's completion callback, or by retention's hook), never `pending` or
`indexing` forever; a re-index racing the settling is left to its own batch. And an
import of NDJSON is one indexing batch, all or nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
import pytest_asyncio

import pgbatch
from pgbatch.workloads import vectors
from pgbatch.workloads.vectors import queries as vector_queries
from pgbatch.workloads.vectors.embedders import EmbedderError
from tests.conftest import settings_for
from tests.helpers import fetch_one, has_pgvector, wait_until
from tests.integration.test_vectors import DIM, _chunks, _gated, running


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


class DownEmbedder:
    """An upstream that is always away: a retryable error on every call."""

    dimension = DIM

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Fail as a 503 that outlasted the client's retries would."""
        raise EmbedderError("upstream answered 503", retryable=True)


async def _library(app: pgbatch.App, name: str, embedder: str = f"hash-{DIM}") -> int:
    return (await vectors.create_library(app, tenant="t", name=name, embedder=embedder)).id


async def _doc(app: pgbatch.App, library_id: int, document_id: int) -> Any:
    return await vectors.get_document(app, library_id, document_id, tenant="t")


@pytest.mark.asyncio
async def test_a_document_whose_shard_died_ends_failed_with_the_reason(
    vapp: pgbatch.App,
) -> None:
    vectors.embedders(vapp).register("down", DownEmbedder)
    library_id = await _library(vapp, "down", "down")
    docs, batch = await vectors.add_documents(
        vapp, library_id, [vectors.DocumentIn(text=f"doc {n}") for n in range(3)], tenant="t"
    )
    assert batch is not None
    async with running(vapp):
        done = await vapp.wait(batch.id, timeout_s=60, callbacks=True)
    assert done.status == "failed" and done.shards_dead == 1
    for doc in docs:
        failed = await _doc(vapp, library_id, doc.id)
        assert failed.status == "failed", failed
        assert failed.error is not None
        assert f"indexing batch {batch.id} ended (failed)" in failed.error
        assert "upstream answered 503" in failed.error
    assert await _chunks(vapp, library_id) == []


class PoisonEmbedder:
    """The hashed embedder, except that a text holding "poison" always fails (retryably)."""

    dimension = DIM

    def __init__(self) -> None:
        self.inner = vectors.HashEmbedder(DIM)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed, unless a text is poison."""
        if any("poison" in text for text in texts):
            raise EmbedderError("poison text", retryable=True)
        return await self.inner.embed(texts)


@pytest.mark.asyncio
async def test_a_document_isolated_as_poison_ends_failed_and_its_neighbours_indexed(
    vapp: pgbatch.App,
) -> None:
    vectors.embedders(vapp).register("poison", PoisonEmbedder)
    library_id = await _library(vapp, "poison", "poison")
    texts = ["fine one", "a poison pill", "fine two", "fine three"]
    docs, batch = await vectors.add_documents(
        vapp, library_id, [vectors.DocumentIn(text=t) for t in texts], tenant="t"
    )
    assert batch is not None
    async with running(vapp):
        done = await vapp.wait(batch.id, timeout_s=60, callbacks=True)
    assert (done.status, done.items_ok, done.items_failed) == ("succeeded", 3, 1)
    states = [await _doc(vapp, library_id, d.id) for d in docs]
    assert [s.status for s in states] == ["indexed", "failed", "indexed", "indexed"]
    error = states[1].error or ""
    assert f"indexing batch {batch.id} ended (succeeded)" in error and "poison text" in error


@pytest.mark.asyncio
async def test_a_cancelled_reindex_leaves_the_document_cancelled_with_its_old_chunks(
    vapp: pgbatch.App,
) -> None:
    library_id = await _library(vapp, "cancel")
    [doc], first = await vectors.add_documents(
        vapp, library_id, [vectors.DocumentIn(text="old words")], tenant="t"
    )
    assert first is not None
    async with running(vapp):
        await vapp.wait(first.id, timeout_s=30, callbacks=True)
    [again], second = await vectors.reindex_documents(
        vapp, library_id, [doc.id], tenant="t", content=vectors.DocumentIn(text="new words")
    )
    assert second is not None and again.content_version == 2
    assert await vapp.cancel(second.id)  # before any worker claims it
    async with running(vapp):
        await vapp.wait(second.id, timeout_s=30, callbacks=True)
    after = await _doc(vapp, library_id, doc.id)
    assert (after.status, after.indexed_version, after.content_version) == ("cancelled", 1, 2)
    assert after.error == f"indexing batch {second.id} was cancelled"
    assert await _chunks(vapp, library_id) == [(doc.id, 0, 1, "old words")]


@pytest.mark.asyncio
async def test_a_cancel_racing_a_commit_leaves_a_consistent_document(vapp: pgbatch.App) -> None:
    # The shard holds its embedding; the cancel and the release are let go together, so
    # either the commit lands first (indexed, with chunks: the settling must leave it) or
    # the cancel reaches the shard first (cancelled, no chunk).
    embedder = _gated(vapp, marker="held")
    library_id = await _library(vapp, "race", f"gated-{DIM}")
    outcomes = []
    for round_no in range(4):
        embedder.gate, embedder.entered = asyncio.Event(), asyncio.Event()
        [doc], batch = await vectors.add_documents(
            vapp, library_id, [vectors.DocumentIn(text=f"held {round_no}")], tenant="t"
        )
        assert batch is not None
        async with running(vapp):
            await asyncio.wait_for(embedder.entered.wait(), 30)
            barrier = asyncio.Barrier(2)

            async def cancel(batch_id: int = batch.id, barrier: Any = barrier) -> None:
                await barrier.wait()
                await vapp.cancel(batch_id)

            async def release(gate: Any = embedder.gate, barrier: Any = barrier) -> None:
                await barrier.wait()
                gate.set()

            await asyncio.gather(cancel(), release())
            await vapp.wait(batch.id, timeout_s=30, callbacks=True)
        state = await _doc(vapp, library_id, doc.id)
        chunks = [c for c in await _chunks(vapp, library_id) if c[0] == doc.id]
        outcomes.append(state.status)
        if state.status == "indexed":
            assert chunks == [(doc.id, 0, 1, f"held {round_no}")]
        else:
            assert (state.status, chunks) == ("cancelled", []), state
    print(f"cancel vs commit outcomes: {outcomes}")


async def _waiting_on_a_lock(app: pgbatch.App) -> bool:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%%vector_documents%%'"
        )
        row = await cur.fetchone()
    return bool(row and row[0])


@pytest.mark.asyncio
async def test_a_reindex_racing_the_settling_belongs_to_its_own_batch(vapp: pgbatch.App) -> None:
    # Forced interleaving, two sessions: a re-index holds the document's row lock (its
    # content version bumped, its batch not yet committed); the settling of the old,
    # cancelled batch starts and waits on that lock; the re-index commits. The settling
    # re-reads the row under the lock: the document is the new batch's, still pending.
    library_id = await _library(vapp, "settle-race")
    docs, old = await vectors.add_documents(
        vapp, library_id, [vectors.DocumentIn(text=f"doc {n}") for n in range(3)], tenant="t"
    )
    assert old is not None
    assert await vapp.cancel(old.id)  # no worker: the settling callback is not run yet
    raced = docs[1]
    async with vapp.db.connection() as conn:
        async with conn.transaction():
            [bumped] = await vector_queries.reindex_documents(
                conn, "t", library_id, [raced.id], version=None, content=None
            )
            settling = asyncio.create_task(vectors.settle_batch(vapp, await vapp.get_batch(old.id)))
            await wait_until(lambda: _waiting_on_a_lock(vapp), timeout_s=10)
            new = await vapp.submit_in(
                conn,
                vectors.TASK,
                [{"library_id": library_id, "document_id": raced.id, "content_version": 2}],
                tenant="t",
                on_complete=vectors.SETTLE_CALLBACK,
            )
            await vector_queries.set_documents_batch(conn, new.id, [raced.id], [2])
        settled = await asyncio.wait_for(settling, 30)
    assert settled == 2
    after = await _doc(vapp, library_id, raced.id)
    assert (after.status, after.content_version, after.batch_id) == ("pending", 2, new.id)
    for other in (docs[0], docs[2]):
        assert (await _doc(vapp, library_id, other.id)).status == "cancelled"
    assert bumped.content_version == 2


@pytest.mark.asyncio
async def test_reindexes_released_with_the_settling_are_never_settled(vapp: pgbatch.App) -> None:
    # True concurrency, no forced order: the settling of a cancelled batch of 24
    # documents and 24 re-indexes (own pooled connections) are released by one barrier.
    # Whatever the order, a re-indexed document is its new batch's and pending.
    library_id = await _library(vapp, "settle-many")
    docs, old = await vectors.add_documents(
        vapp, library_id, [vectors.DocumentIn(text=f"doc {n}") for n in range(24)], tenant="t"
    )
    assert old is not None
    assert await vapp.cancel(old.id)
    cancelled = await vapp.get_batch(old.id)
    barrier = asyncio.Barrier(len(docs) + 1)

    async def settle() -> int:
        await barrier.wait()
        return await vectors.settle_batch(vapp, cancelled)

    async def reindex(document_id: int) -> int | None:
        await barrier.wait()
        _, batch = await vectors.reindex_documents(vapp, library_id, [document_id], tenant="t")
        return None if batch is None else batch.id

    _, *batches = await asyncio.gather(settle(), *(reindex(d.id) for d in docs))
    for doc, batch_id in zip(docs, batches, strict=True):
        after = await _doc(vapp, library_id, doc.id)
        assert (after.status, after.content_version, after.batch_id) == ("pending", 2, batch_id)


@pytest.mark.asyncio
async def test_a_pruned_batch_leaves_no_document_pending(vapp: pgbatch.App) -> None:
    # The settling callback was given up (dead): retention may prune the batch, and its
    # hook settles what the batch still owned.
    library_id = await _library(vapp, "pruned")
    [doc], batch = await vectors.add_documents(
        vapp, library_id, [vectors.DocumentIn(text="never indexed")], tenant="t"
    )
    assert batch is not None
    assert await vapp.cancel(batch.id)
    async with vapp.db.connection() as conn:
        await conn.execute(
            "UPDATE pgbatch.callbacks SET status = 'dead' WHERE batch_id = %s", (batch.id,)
        )
    report = await vapp.prune(finished_before=datetime.now(UTC) + timedelta(hours=1))
    assert batch.id in report.cleaned
    after = await _doc(vapp, library_id, doc.id)
    assert after.status == "failed"
    assert after.error == f"indexing batch {batch.id} was pruned before it settled this version"


def _ndjson(*lines: str) -> list[bytes]:
    return [line.encode() + b"\n" for line in lines]


async def _documents_of(app: pgbatch.App, library_id: int) -> int:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgbatch.vector_documents WHERE library_id = %s", (library_id,)
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def _batches_of(app: pgbatch.App, tenant: str) -> int:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgbatch.batches WHERE tenant = %s", (tenant,)
        )
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.asyncio
async def test_an_import_is_one_batch_and_indexes_every_line(vapp: pgbatch.App) -> None:
    library_id = await _library(vapp, "import")
    lines = [f'{{"text": "line {n} text", "metadata": {{"n": {n}}}}}' for n in range(70)]
    lines.insert(5, "")  # a blank line is skipped, and still counts as a line
    lines.append('{"chunks": ["tab\\there", "back\\\\slash", "new\\nline"]}')
    before = await _batches_of(vapp, "t")
    count, batch = await vectors.import_documents(vapp, library_id, _ndjson(*lines), tenant="t")
    assert count == 71 and batch is not None
    assert (batch.total_items, batch.on_complete) == (71, vectors.SETTLE_CALLBACK)
    assert await _batches_of(vapp, "t") == before + 1
    async with running(vapp):
        done = await vapp.wait(batch.id, timeout_s=60, callbacks=True)
    assert (done.items_ok, done.items_failed) == (71, 0)
    counts = await vectors.status_counts(vapp, library_id, tenant="t")
    assert counts == {"indexed": 71}
    texts = {c[3] for c in await _chunks(vapp, library_id)}
    assert {"tab\there", "back\\slash", "new\nline", "line 69 text"} <= texts


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("{not json", "not JSON"),
        ('{"text": ""}', "text must not be empty"),
        ('{"text": "x", "extra": 1}', 'a line is an object of "text"'),
        ('{"chunks": "not a list"}', "chunks must be a list"),
        ('{"text": "nul \\u0000 here"}', "NUL"),
    ],
)
async def test_a_bad_line_names_itself_and_nothing_is_written(
    vapp: pgbatch.App, bad: str, says: str
) -> None:
    library_id = await _library(vapp, "bad")
    before = await _batches_of(vapp, "t")
    lines = _ndjson('{"text": "fine"}', "", '{"text": "also fine"}', bad, '{"text": "after"}')
    with pytest.raises(vectors.ImportLineError) as raised:
        await vectors.import_documents(vapp, library_id, lines, tenant="t")
    assert raised.value.line == 4 and says in str(raised.value), str(raised.value)
    assert await _documents_of(vapp, library_id) == 0
    assert await _batches_of(vapp, "t") == before


@pytest.mark.asyncio
async def test_an_import_into_another_tenants_library_is_refused(vapp: pgbatch.App) -> None:
    library_id = await _library(vapp, "mine")
    with pytest.raises(vectors.LibraryNotFoundError):
        await vectors.import_documents(
            vapp, library_id, _ndjson('{"text": "x"}'), tenant="someone else"
        )
    assert await _documents_of(vapp, library_id) == 0


@pytest.mark.asyncio
async def test_a_database_at_vectors_0001_upgrades_to_0002_in_place(
    empty_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No pgvector needed: the documents table is plain. The previous release's schema
    # (vectors 0001) with a library and documents in every old status upgrades in place.
    from pgbatch.db import migrations

    real = migrations.available_migrations

    def up_to_0001(component: Any = migrations.CORE) -> Any:
        found = real(component)
        if component.name == vector_queries.COMPONENT_NAME:
            return [m for m in found if m.version <= 1]
        return found

    monkeypatch.setattr(migrations, "available_migrations", up_to_0001)
    old = pgbatch.App(settings=settings_for(empty_database))
    old.use(vectors.WORKLOAD)
    await old.open()
    await old.close()
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO pgbatch.vector_libraries (tenant, name, embedder, dimension) "
            "VALUES ('t', 'old', 'hash-32', 32)"
        )
        for status in ("pending", "indexing", "indexed", "failed"):
            conn.execute(
                "INSERT INTO pgbatch.vector_documents (library_id, body, status, batch_id) "
                "VALUES (1, 'text', %s, 7)",
                (status,),
            )
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "INSERT INTO pgbatch.vector_documents (library_id, body, status) "
                "VALUES (1, 'text', 'cancelled')"
            )
    monkeypatch.setattr(migrations, "available_migrations", real)
    apps = [pgbatch.App(settings=settings_for(empty_database)) for _ in range(2)]
    for app in apps:
        app.use(vectors.WORKLOAD)
    await asyncio.gather(*(app.open() for app in apps))  # two processes starting at once
    try:
        async with apps[0].db.connection() as conn:
            cur = await conn.execute(
                "SELECT version FROM pgbatch.workload_migrations "
                "WHERE component = 'vectors' ORDER BY 1"
            )
            # Every shipped version from 0002 on applies (0003 too, when it ships).
            versions = [v for (v,) in await cur.fetchall()]
            assert versions[:2] == [1, 2]
            assert versions == sorted(set(versions))
            cur = await conn.execute(
                "SELECT status FROM pgbatch.vector_documents WHERE batch_id = 7 ORDER BY id"
            )
            assert [r[0] for r in await cur.fetchall()] == [
                "pending", "indexing", "indexed", "failed"
            ]  # fmt: skip
            await conn.execute(
                "UPDATE pgbatch.vector_documents SET status = 'cancelled' WHERE status = 'pending'"
            )
            await conn.commit()
            # What the settling does to a batch's documents, on the upgraded table.
            assert await vector_queries.settle_documents(
                conn, 7, status="failed", error="settled", limit=100
            ) == (1, 1)
            await conn.commit()
    finally:
        await asyncio.gather(*(app.close() for app in apps))
    assert await fetch_one(
        empty_database,
        "SELECT count(*) FROM pg_indexes WHERE indexname = 'vector_documents_batch_idx'",
    ) == (1,)


@pytest.mark.asyncio
async def test_documents_whose_batch_cannot_be_submitted_are_not_written(
    database_url: str,
) -> None:
    # The documents and their batch are one transaction: a submit refused (here a shard
    # over the size bound) leaves no document pending, for an add and for a re-index.
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")
    app = pgbatch.App(settings=settings_for(database_url, max_shard_bytes=1024))
    app.use(vectors.WORKLOAD)
    async with app:
        library_id = await _library(app, "atomic")
        with pytest.raises(pgbatch.ShardTooLargeError):
            await vectors.add_documents(
                app, library_id, [vectors.DocumentIn(text=f"d{n}") for n in range(30)], tenant="t"
            )
        assert await _documents_of(app, library_id) == 0
        docs, _ = await vectors.add_documents(
            app, library_id, [vectors.DocumentIn(text=f"d{n}") for n in range(10)], tenant="t"
        )
        more, _ = await vectors.add_documents(
            app, library_id, [vectors.DocumentIn(text=f"e{n}") for n in range(10)], tenant="t"
        )
        with pytest.raises(pgbatch.ShardTooLargeError):
            await vectors.reindex_documents(
                app, library_id, [d.id for d in docs + more], tenant="t"
            )
        for doc in docs + more:
            assert (await _doc(app, library_id, doc.id)).content_version == 1
