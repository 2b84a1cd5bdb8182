"""The writer's machinery on a real PostgreSQL: lock order, retries, conflicts, lanes, shutdown.

Concurrency here is real: separate Database pools (separate connections) whose flushes
are released together on a barrier inside their transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Collection, Sequence
from typing import Any

import psycopg
import pytest
import pytest_asyncio

from pgbatch.db.database import TX_RETRY_ATTEMPTS, Database
from pgbatch.workloads.documents import (
    DocumentRow,
    DocumentSink,
    create_document_tables,
    document_item,
    document_key,
)
from pgbatch.writer import WriteFailedError, WriteItem, Writer, WriterClosedError, WriteStatus

Item = WriteItem[uuid.UUID, DocumentRow]
NEVER_MS = 600_000.0


def doc(n: int, *refs: int, partition: str = "p") -> Item:
    """Return the item of test document `n` referencing documents `refs`."""
    return document_item(
        {"type": "t", "id": str(n)},
        {"n": n},
        references=[{"type": "t", "id": str(r)} for r in refs],
        partition=partition,
    )


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    """Return an open Database with the documents tables; deadlocks are detected in 50 ms."""
    async with Database(database_url, max_size=6) as database:
        async with database.connection() as conn:
            # Only new sessions see it: the pools below open theirs afterwards. Without
            # the privilege the default (1 s) applies and the deadlock test takes longer.
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                dbname = conn.info.dbname
                await conn.execute(f"ALTER DATABASE \"{dbname}\" SET deadlock_timeout = '50ms'")
        await create_document_tables(database)
    async with Database(database_url, max_size=6) as database:
        yield database


async def stored_keys(db: Database) -> set[uuid.UUID]:
    """Return the key of every stored document."""
    async with db.connection() as conn:
        return {
            row[0]
            for row in await (await conn.execute("SELECT key FROM pgbatch.documents")).fetchall()
        }


class GatedSink(DocumentSink):
    """The document sink, holding each first transaction at a barrier before it writes."""

    def __init__(self, barrier: asyncio.Barrier | None = None) -> None:
        self.barrier = barrier
        self.attempts = 0

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[Item]
    ) -> Collection[uuid.UUID] | None:
        self.attempts += 1
        if self.barrier is not None and self.attempts == 1:
            await self.barrier.wait()  # both writers are about to write: go together
        return await super().write_flush(conn, items)


@pytest.mark.asyncio
async def test_two_writers_on_overlapping_keys_in_opposite_order_do_not_deadlock(
    db: Database, database_url: str
) -> None:
    # Updates of existing rows, so each statement must lock every row it touches.
    keys = range(1000)
    async with Writer(db, DocumentSink(), max_batch=len(keys), max_delay_ms=NEVER_MS) as setup:
        await asyncio.gather(*(setup.write(doc(n)) for n in keys))

    barrier = asyncio.Barrier(2)
    async with (
        Database(database_url, max_size=2) as db_a,
        Database(database_url, max_size=2) as db_b,
    ):
        writer_a = Writer(db_a, GatedSink(barrier), max_batch=len(keys), max_delay_ms=NEVER_MS)
        writer_b = Writer(db_b, GatedSink(barrier), max_batch=len(keys), max_delay_ms=NEVER_MS)
        async with writer_a, writer_b:
            forward = [asyncio.create_task(writer_a.write(doc(n))) for n in keys]
            backward = [asyncio.create_task(writer_b.write(doc(n))) for n in reversed(keys)]
            outcomes = await asyncio.gather(*forward, *backward)
    assert {o.status for o in outcomes} == {WriteStatus.WRITTEN}
    # Both flushes lock in key order, whatever order their callers came in: no deadlock.
    assert writer_a.stats.retries == writer_b.stats.retries == 0
    assert writer_a.stats.flushes == writer_b.stats.flushes == 1


class ReverseLockingSink(DocumentSink):
    """A sink that locks two rows in a caller-chosen order first: a deadlock on purpose."""

    def __init__(self, first: uuid.UUID, second: uuid.UUID, barrier: asyncio.Barrier) -> None:
        self.order = (first, second)
        self.barrier = barrier
        self.attempts = 0

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[Item]
    ) -> Collection[uuid.UUID] | None:
        self.attempts += 1
        if self.attempts > 1:
            return await super().write_flush(conn, items)
        # The fast path is one implicit transaction: hold the locks in an explicit one.
        async with conn.transaction():
            lock = "SELECT 1 FROM pgbatch.documents WHERE key = %s FOR UPDATE"
            await conn.execute(lock, (self.order[0],))
            await self.barrier.wait()  # each writer holds its first row: now cross over
            await conn.execute(lock, (self.order[1],))
            return await super().write_flush(conn, items)


@pytest.mark.asyncio
async def test_an_injected_deadlock_is_retried_and_every_caller_is_written(
    db: Database, database_url: str
) -> None:
    one, two = doc(1), doc(2)
    async with Writer(db, DocumentSink(), max_batch=2, max_delay_ms=NEVER_MS) as setup:
        await asyncio.gather(setup.write(one), setup.write(two))

    barrier = asyncio.Barrier(2)
    sink_a = ReverseLockingSink(one.key, two.key, barrier)
    sink_b = ReverseLockingSink(two.key, one.key, barrier)
    async with (
        Database(database_url, max_size=2) as db_a,
        Database(database_url, max_size=2) as db_b,
    ):
        writer_a = Writer(db_a, sink_a, max_batch=2, max_delay_ms=NEVER_MS)
        writer_b = Writer(db_b, sink_b, max_batch=2, max_delay_ms=NEVER_MS)
        async with writer_a, writer_b:
            outcomes = await asyncio.gather(
                writer_a.write(doc(1)), writer_a.write(doc(2, 1)),
                writer_b.write(doc(2)), writer_b.write(doc(1, 2)),
            )  # fmt: skip
    assert [o.status for o in outcomes] == [WriteStatus.WRITTEN] * 4
    # PostgreSQL broke the deadlock by failing one transaction; it was retried.
    assert writer_a.stats.retries + writer_b.stats.retries == 1
    assert sink_a.attempts + sink_b.attempts == 3
    assert await stored_keys(db) == {one.key, two.key}


class UncommittedSink(DocumentSink):
    """A sink whose first flush writes inside an explicit transaction left open until released."""

    def __init__(self) -> None:
        self.written = asyncio.Event()
        self.release = asyncio.Event()

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[Item]
    ) -> Collection[uuid.UUID] | None:
        async with conn.transaction():
            found = await super().write_flush(conn, items)
            self.written.set()
            await self.release.wait()
        return found


async def references_of(db: Database, parent: uuid.UUID) -> set[uuid.UUID]:
    """Return the targets `parent` references."""
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT target FROM pgbatch.document_references WHERE parent = %s", (parent,)
        )
        return {row[0] for row in await cur.fetchall()}


async def wait_for_a_lock_wait(db: Database) -> None:
    """Return once some backend of this database waits for a lock."""
    async with db.connection() as conn:
        for _ in range(500):
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            row = await cur.fetchone()
            if row and row[0]:
                return
            await asyncio.sleep(0.01)
    raise AssertionError("no backend ever waited for a lock")


@pytest.mark.asyncio
async def test_concurrent_reposts_of_one_key_leave_only_the_last_ones_references(
    db: Database, database_url: str
) -> None:
    # Two processes post the same identity at once with different references: the later
    # upsert waits for the earlier transaction, and must then replace the references that
    # transaction committed (invisible to a snapshot taken before the wait).
    async with Writer(db, DocumentSink(), max_batch=2, max_delay_ms=NEVER_MS) as setup:
        await asyncio.gather(setup.write(doc(1)), setup.write(doc(2)))
    first_sink = UncommittedSink()
    async with (
        Database(database_url, max_size=2) as db_a,
        Database(database_url, max_size=2) as db_b,
        Writer(db_a, first_sink, max_batch=1, max_delay_ms=0) as first,
        Writer(db_b, DocumentSink(), max_batch=1, max_delay_ms=0) as second,
    ):
        first_post = asyncio.create_task(first.write(doc(9, 1)))
        await first_sink.written.wait()
        second_post = asyncio.create_task(second.write(doc(9, 2)))
        await wait_for_a_lock_wait(db)  # the second upsert waits for the first commit
        first_sink.release.set()
        outcomes = await asyncio.gather(first_post, second_post)
    assert [o.status for o in outcomes] == [WriteStatus.WRITTEN] * 2
    assert await references_of(db, doc(9).key) == {doc(2).key}


class AlwaysFailingSink(DocumentSink):
    """A sink whose write fails with a server-raised SQLSTATE every time."""

    def __init__(self, sqlstate: str) -> None:
        self.sqlstate = sqlstate
        self.attempts = 0

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[Item]
    ) -> Collection[uuid.UUID] | None:
        self.attempts += 1
        await conn.execute(
            f"DO $$ BEGIN RAISE EXCEPTION 'injected' USING ERRCODE = '{self.sqlstate}'; END $$"
        )
        return None


@pytest.mark.asyncio
@pytest.mark.parametrize("sqlstate", ["40P01", "40001"])
async def test_conflicts_that_outlast_the_retries_become_conflict_outcomes(
    db: Database, sqlstate: str
) -> None:
    sink = AlwaysFailingSink(sqlstate)
    async with Writer(db, sink, max_batch=3, max_delay_ms=NEVER_MS) as writer:
        outcomes = await asyncio.gather(*(writer.write(doc(n)) for n in range(3)))
    assert {o.status for o in outcomes} == {WriteStatus.CONFLICT}
    assert {o.sqlstate for o in outcomes} == {sqlstate}
    assert sink.attempts == TX_RETRY_ATTEMPTS
    stats = writer.stats
    assert stats.conflicts == 3 and stats.retries == TX_RETRY_ATTEMPTS - 1 and stats.failed == 0
    assert await stored_keys(db) == set()


class BrokenSink(DocumentSink):
    """A sink whose write fails as if the database went away."""

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[Item]
    ) -> Collection[uuid.UUID] | None:
        raise psycopg.OperationalError("server closed the connection unexpectedly")


@pytest.mark.asyncio
async def test_a_flush_that_fails_as_a_whole_raises_write_failed_to_its_callers(
    db: Database,
) -> None:
    async with Writer(db, BrokenSink(), max_batch=2, max_delay_ms=NEVER_MS) as writer:
        results = await asyncio.gather(
            writer.write(doc(1, 2)), writer.write(doc(2, 1)), return_exceptions=True
        )
    assert all(isinstance(r, WriteFailedError) for r in results)
    assert writer.stats.failed == 2


class HeldSink(DocumentSink):
    """A sink that holds the flushes of one partition until released, counting overlaps."""

    def __init__(self, held_partition: str) -> None:
        self.held_partition = held_partition
        self.release = asyncio.Event()
        self.holding = asyncio.Event()
        self.in_flight: dict[str, int] = {}
        self.most_in_flight: dict[str, int] = {}

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[Item]
    ) -> Collection[uuid.UUID] | None:
        partition = items[0].partition
        self.in_flight[partition] = self.in_flight.get(partition, 0) + 1
        self.most_in_flight[partition] = max(
            self.most_in_flight.get(partition, 0), self.in_flight[partition]
        )
        try:
            if partition == self.held_partition:
                self.holding.set()
                await self.release.wait()
            return await super().write_flush(conn, items)
        finally:
            self.in_flight[partition] -= 1


@pytest.mark.asyncio
async def test_lanes_commit_independently_with_one_transaction_in_flight_each(
    db: Database,
) -> None:
    sink = HeldSink("slow")
    writer = Writer(db, sink, max_batch=4, max_delay_ms=0, lanes=2)
    fast = next(
        f"fast-{n}" for n in range(100) if writer.lane_of(f"fast-{n}") != writer.lane_of("slow")
    )
    async with writer:
        slow_calls = [
            asyncio.create_task(writer.write(doc(n, partition="slow"))) for n in range(12)
        ]
        await sink.holding.wait()
        # Lane 0 is stuck inside a transaction; lane 1 commits meanwhile.
        fast_outcomes = await asyncio.gather(
            *(writer.write(doc(100 + n, partition=fast)) for n in range(12))
        )
        assert all(o.written for o in fast_outcomes)
        assert not any(call.done() for call in slow_calls)
        sink.release.set()
        assert all(o.written for o in await asyncio.gather(*slow_calls))
    assert sink.most_in_flight == {"slow": 1, fast: 1}
    assert len(await stored_keys(db)) == 24


@pytest.mark.asyncio
async def test_backpressure_bounds_the_queue_and_stop_flushes_everything_accepted(
    db: Database,
) -> None:
    sink = HeldSink("p")
    writer = Writer(db, sink, max_batch=4, max_delay_ms=0, max_queue=8, lanes=1)
    writer.start()
    calls = [asyncio.create_task(writer.write(doc(n))) for n in range(40)]
    await sink.holding.wait()  # one flush of 4 is held; 8 queue up; 28 wait to enter
    assert writer.stats.queue_depth == 8
    stopping = asyncio.create_task(writer.stop())
    sink.release.set()
    await stopping
    outcomes = await asyncio.gather(*calls)
    assert all(o.written for o in outcomes)  # nothing accepted was dropped
    stats = writer.stats
    assert stats.max_queue_depth <= 8 and max(stats.flush_sizes) <= 4
    assert stats.written == stats.items == 40
    assert len(await stored_keys(db)) == 40
    with pytest.raises(WriterClosedError):
        await writer.write(doc(99))


@pytest.mark.asyncio
async def test_tables_of_an_earlier_pgbatch_move_into_its_schema_with_their_rows(
    server_url: str, template_db: str
) -> None:
    # pgbatch at dbe590b made the tables at run time in the search path's schema (and
    # databases older than 7b7d56a had them without the write functions).
    from uuid import uuid4

    from psycopg.conninfo import make_conninfo

    name = f"pgbatch_t_{uuid4().hex[:12]}"
    admin = make_conninfo(server_url, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    url = make_conninfo(server_url, dbname=name)
    parent, child = document_key({"type": "t", "id": "p"}), document_key({"type": "t", "id": "c"})
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            await conn.execute(
                """
                CREATE TABLE documents (
                    key uuid PRIMARY KEY, partition text NOT NULL, type text NOT NULL,
                    identity jsonb NOT NULL, body jsonb NOT NULL CONSTRAINT
                        documents_body_is_object CHECK (jsonb_typeof(body) = 'object'),
                    created_at timestamptz NOT NULL DEFAULT now(),
                    updated_at timestamptz NOT NULL DEFAULT now());
                CREATE TABLE document_references (
                    parent uuid NOT NULL REFERENCES documents (key) ON DELETE CASCADE,
                    target uuid NOT NULL REFERENCES documents (key),
                    PRIMARY KEY (parent, target));
                """
            )
            await conn.execute(
                "INSERT INTO documents (key, partition, type, identity, body) VALUES"
                ' (%s, \'default\', \'t\', \'{"type": "t", "id": "p"}\', \'{"n": 1}\'),'
                ' (%s, \'default\', \'t\', \'{"type": "t", "id": "c"}\', \'{"n": 2}\')',
                (parent, child),
            )
            await conn.execute("INSERT INTO document_references VALUES (%s, %s)", (parent, child))
        async with Database(url, max_size=2) as db:
            await create_document_tables(db)
            await create_document_tables(db)  # applied once
            async with db.connection() as conn:
                cur = await conn.execute(
                    "SELECT to_regclass('public.documents'), count(*) FROM pgbatch.documents"
                )
                assert await cur.fetchone() == (None, 2)
                cur = await conn.execute("SELECT parent, target FROM pgbatch.document_references")
                assert await cur.fetchall() == [(parent, child)]
            async with Writer(db, DocumentSink(), max_batch=4, max_delay_ms=0) as writer:
                assert (await writer.write(doc(1))).written
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
