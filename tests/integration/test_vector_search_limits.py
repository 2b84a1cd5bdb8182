"""Vector search under a filter and under hostile load: k hits, exact-search caps, timeouts.

On the embedded server (pgvector); skipped, saying why, on a server without it. Chunks
are written straight into the library's table (the indexing batch has its own tests), so
that the geometry is the test's: near chunks the filter drops, far ones it keeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from collections.abc import AsyncIterator

import psycopg
import pytest
import pytest_asyncio

import pgbatch
from pgbatch.workloads import vectors
from pgbatch.workloads.vectors import queries as vector_queries
from tests.conftest import settings_for
from tests.helpers import has_pgvector, wait_until

DIM = 8
DOCS = 400
CHUNKS_PER_DOC = 5
# Half the documents are far from the query and carry {"far": true}: the planner rightly
# expects a filter on it to keep half the rows and starts from the index, whose nearest
# candidates the filter then all drops (a filter that anti-correlates with the query).
K = 10
EXACT_RACERS = 8


@pytest_asyncio.fixture
async def sapp(database_url: str) -> AsyncIterator[pgbatch.App]:
    """An open App using the vectors workload; lock waits without a timeout (see below)."""
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")
    # The tests below hold a chunk table's lock to keep searches in flight; the default
    # 2 s lock timeout would end them on a slow machine before the test releases it.
    app = pgbatch.App(settings=settings_for(database_url, session_lock_timeout_ms=0))
    app.use(vectors.WORKLOAD)
    await app.open()
    yield app
    await app.close()


def _vector(n: int, seq: int) -> str:
    """Document n's chunk seq: on the half circle from +x (n = 0) to -x, with a little noise.

    A continuum, not two islands: with two far-apart clusters HNSW's graph may not link
    them, and an index scan then ends (its reachable part exhausted) with fewer than k
    rows whatever ef_search is; the exact fallback covers that, the arc tests the scan.
    """
    angle = math.pi * (n + seq / CHUNKS_PER_DOC) / DOCS
    rest = [0.02 * (((n * 7 + seq) * (i + 3)) % 11 - 5) for i in range(DIM - 2)]
    return "[" + ",".join(f"{v:.5f}" for v in (math.cos(angle), math.sin(angle), *rest)) + "]"


async def _library(app: pgbatch.App, tenant: str, name: str = "geo") -> int:
    """Make a library of DOCS documents, the half farther from +x with {"far": true}."""
    library = await vectors.create_library(app, tenant=tenant, name=name, embedder=f"hash-{DIM}")
    docs = [
        vectors.DocumentIn(
            chunks=["x"], metadata={"far": n >= DOCS // 2} | ({"solo": True} if n == 1 else {})
        )
        for n in range(DOCS)
    ]
    added, _ = await vectors.add_documents(app, library.id, docs, tenant=tenant)
    rows = [
        (d.id, seq, 1, f"d{n}c{seq}", _vector(n, seq))
        for n, d in enumerate(added)
        for seq in range(CHUNKS_PER_DOC)
    ]
    async with app.db.connection() as conn:
        async with conn.cursor() as cur:
            async with cur.copy(
                f"COPY pgbatch.vector_chunks_{library.id} "
                "(document_id, seq, content_version, text, embedding) FROM STDIN"
            ) as copy:
                for row in rows:
                    await copy.write_row(row)
        await conn.execute(f"ANALYZE pgbatch.vector_chunks_{library.id}")
        await conn.execute("ANALYZE pgbatch.vector_documents")
        await conn.commit()
    return library.id


QUERY = [1.0] + [0.0] * (DIM - 1)


def _text(vector: list[float]) -> str:
    return "[" + ",".join(map(str, vector)) + "]"


async def _plan(app: pgbatch.App, library_id: int) -> str:
    """The plan of the filtered HNSW search (it must start from the index, or the test
    would pass on the planner's exact plan without exercising the scan)."""
    async with app.db.connection() as conn:
        async with conn.transaction():
            await conn.execute("SET LOCAL hnsw.iterative_scan = relaxed_order")
            cur = await conn.execute(
                psycopg.sql.SQL("EXPLAIN ")
                + vector_queries._composed("vector_search_hnsw", library_id),
                {
                    "query": _text(QUERY),
                    "k": K,
                    "filter": psycopg.types.json.Jsonb({"far": True}),
                },
            )
            return "\n".join(str(r[0]) for r in await cur.fetchall())


@pytest.mark.asyncio
async def test_a_filtered_search_returns_k_hits_when_k_exist(sapp: pgbatch.App) -> None:
    library_id = await _library(sapp, "t1")
    plan = await _plan(sapp, library_id)
    assert f"vector_chunks_{library_id}_hnsw" in plan, plan
    exact = await vectors.search(
        sapp, library_id, tenant="t1", vector=QUERY, k=K,
        metadata_filter={"far": True}, exact=True,
    )  # fmt: skip
    assert len(exact) == K and all(h.metadata["far"] for h in exact)
    want = [(h.document_id, h.seq) for h in exact]
    # ef_search = k: the first candidates are all near +x and all filtered out; the
    # iterative scan goes on through the graph until k chunks pass the filter.
    iterative = await vectors.search(
        sapp, library_id, tenant="t1", vector=QUERY, k=K,
        metadata_filter={"far": True}, ef_search=K,
    )  # fmt: skip
    assert [(h.document_id, h.seq) for h in iterative] == want
    # ...by itself, not by the exact fallback below: the index query alone gives k.
    async with sapp.db.connection() as conn:
        async with conn.transaction():
            await vector_queries.search_settings(
                conn, ef_search=K, max_scan_tuples=20_000, statement_timeout_ms=0
            )
            alone = await vector_queries.search(
                conn, library_id, vector_text=_text(QUERY), k=K,
                metadata_filter={"far": True}, exact=False,
            )  # fmt: skip
    assert [(r.document_id, r.seq) for r in alone] == want
    # A scan allowed 50 chunks stops short of the far ones: the exact fallback gives k.
    short = await vectors.search(
        sapp, library_id, tenant="t1", vector=QUERY, k=K,
        metadata_filter={"far": True}, ef_search=K, max_scan_tuples=50,
    )  # fmt: skip
    assert [(h.document_id, h.seq) for h in short] == want
    # The fallback is an exact search: it takes one of the tenant's exact slots.
    vectors.set_search_limits(sapp, vectors.SearchLimits(exact_per_tenant=1))
    async with vectors.search_limits(sapp).slot("t1"):
        with pytest.raises(vectors.SearchBusyError):
            await vectors.search(
                sapp, library_id, tenant="t1", vector=QUERY, k=K,
                metadata_filter={"far": True}, ef_search=K, max_scan_tuples=50,
            )  # fmt: skip
    # And when fewer than k exist, all of them (the filter keeps 5 chunks).
    one = await vectors.search(
        sapp, library_id, tenant="t1", vector=QUERY, k=K, metadata_filter={"solo": True},
        ef_search=K, max_scan_tuples=50,
    )  # fmt: skip
    assert sorted(h.seq for h in one) == list(range(CHUNKS_PER_DOC))


@contextlib.asynccontextmanager
async def _table_locked(conninfo: str, library_id: int) -> AsyncIterator[None]:
    """Hold the chunk table in ACCESS EXCLUSIVE from another session: searches wait."""
    async with await psycopg.AsyncConnection.connect(conninfo) as conn:
        await conn.execute(
            f"LOCK TABLE pgbatch.vector_chunks_{library_id} IN ACCESS EXCLUSIVE MODE"
        )
        yield
        await conn.rollback()


async def _waiting_on(app: pgbatch.App, library_id: int) -> int:
    """How many sessions wait for a lock on the library's chunk table."""
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = %s::regclass",
            (f"pgbatch.vector_chunks_{library_id}",),
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


@pytest.mark.asyncio
async def test_concurrent_exact_searches_past_the_tenants_cap_are_refused(
    sapp: pgbatch.App, database_url: str
) -> None:
    # No statement timeout: the admitted searches wait on the lock as long as the test holds it.
    limits = vectors.SearchLimits(exact_per_tenant=2, exact_total=3, statement_timeout_ms=0)
    vectors.set_search_limits(sapp, limits)
    hostile = await _library(sapp, "hostile")
    other = await _library(sapp, "other")
    slots = vectors.search_limits(sapp)
    barrier = asyncio.Barrier(EXACT_RACERS)

    async def exact_search() -> str:
        await barrier.wait()
        try:
            hits = await vectors.search(
                sapp, hostile, tenant="hostile", vector=QUERY, k=K, exact=True
            )
        except vectors.SearchBusyError:
            return "busy"
        return f"{len(hits)} hits"

    async with _table_locked(database_url, hostile):
        racers = [asyncio.create_task(exact_search()) for _ in range(EXACT_RACERS)]

        # The admitted searches hold their slots while they wait on the table's lock; the
        # others are refused at once.
        async def two_wait() -> bool:
            return await _waiting_on(sapp, hostile) == 2

        await wait_until(two_wait, 60, message="two exact searches waiting on the lock")
        await wait_until(
            lambda: sum(r.done() for r in racers) == EXACT_RACERS - 2, 60, message="refusals"
        )
        assert (slots.active("hostile"), slots.active()) == (2, 2)
        # Another tenant is not refused while the hostile one is at its cap...
        mine = await vectors.search(sapp, other, tenant="other", vector=QUERY, k=K, exact=True)
        assert len(mine) == K
        # ...until the process-wide cap is reached too.
        async with slots.slot("third"):
            with pytest.raises(vectors.SearchBusyError, match="PGBATCH_VECTORS_MAX_EXACT"):
                await vectors.search(sapp, other, tenant="other", vector=QUERY, exact=True)
            # HNSW searches are not capped.
            assert len(await vectors.search(sapp, other, tenant="other", vector=QUERY)) == K
    outcomes = await asyncio.gather(*racers)
    assert Counter(outcomes) == {"busy": EXACT_RACERS - 2, f"{K} hits": 2}
    assert slots.active() == 0


@pytest.mark.asyncio
async def test_a_search_past_the_statement_timeout_is_cancelled(
    sapp: pgbatch.App, database_url: str
) -> None:
    vectors.set_search_limits(sapp, vectors.SearchLimits(statement_timeout_ms=200))
    library_id = await _library(sapp, "t1")
    async with _table_locked(database_url, library_id):
        # The lock never comes (no lock timeout in this app): the statement timeout ends it.
        for exact in (False, True):
            with pytest.raises(vectors.SearchTimeoutError, match="statement timeout"):
                await vectors.search(sapp, library_id, tenant="t1", vector=QUERY, exact=exact)
    assert vectors.search_limits(sapp).active() == 0
    # The connection went back to the pool clean: the next search works.
    assert len(await vectors.search(sapp, library_id, tenant="t1", vector=QUERY, k=K)) == K


def test_search_limits_come_from_the_environment() -> None:
    env = {
        "PGBATCH_VECTORS_MAX_EXACT_PER_TENANT": "3",
        "PGBATCH_VECTORS_MAX_EXACT": "12",
        "PGBATCH_VECTORS_SEARCH_TIMEOUT_MS": "0",
    }
    assert vectors.SearchLimits.from_env(env) == vectors.SearchLimits(3, 12, 0)
    assert vectors.SearchLimits.from_env({}) == vectors.SearchLimits()
    with pytest.raises(pgbatch.ConfigurationError, match="PGBATCH_VECTORS_MAX_EXACT="):
        vectors.SearchLimits.from_env({"PGBATCH_VECTORS_MAX_EXACT": "many"})
    with pytest.raises(pgbatch.ConfigurationError):
        vectors.SearchLimits.from_env({"PGBATCH_VECTORS_MAX_EXACT_PER_TENANT": "0"})
