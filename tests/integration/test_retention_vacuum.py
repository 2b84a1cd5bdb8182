"""The pruner's VACUUM: after a pass that deleted rows, bounded per table, never waiting."""

from __future__ import annotations

import asyncio

import pytest

import pgbatch
from pgbatch.db.retention import vacuum_pruned_tables
from pgbatch.engine.pruner import prune_once
from tests.conftest import settings_for
from tests.helpers import register_noop

# A deadline for a call that must not wait on a lock, not a measure of its speed.
NO_WAIT_DEADLINE_S = 30.0


async def _vacuum_count(app: pgbatch.App, table: str) -> int:
    async with app.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT vacuum_count FROM pg_stat_all_tables WHERE relid = %s::regclass",
                (f"pgbatch.{table}",),
            )
        ).fetchone()
    return int(row[0]) if row else 0


async def _finished_batch(app: pgbatch.App) -> int:
    batch = await app.submit("t", range(20), shard_size=1, retention_s=0)
    worker = app.worker(concurrency=4)
    task = asyncio.create_task(worker.run())
    try:
        await app.wait(batch.id, timeout_s=30)
    except pgbatch.BatchPrunedError:
        pass
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
    return batch.id


@pytest.mark.asyncio
async def test_a_pass_that_pruned_vacuums_its_tables_at_most_once_per_interval(
    database_url: str,
) -> None:
    # An hour between vacuums, and the worker's own pruner out of the way.
    settings = settings_for(
        database_url, retention_vacuum_interval_s=3600, retention_interval_s=3600
    )
    async with pgbatch.App(settings=settings) as app:
        register_noop(app)
        await _finished_batch(app)
        before = await _vacuum_count(app, "shards")
        report = await prune_once(app.db, settings, ())
        assert report is not None and report.pruned
        assert {"shards", "item_blocks", "result_blocks", "batches"} <= set(report.vacuumed)
        assert await _vacuum_count(app, "shards") == before + 1
        # The next pass prunes too, but every table was vacuumed less than an hour ago.
        await _finished_batch(app)
        report = await prune_once(app.db, settings, ())
        assert report is not None and report.pruned and report.vacuumed == []
        assert await _vacuum_count(app, "shards") == before + 1


@pytest.mark.asyncio
async def test_no_vacuum_when_switched_off_or_when_nothing_was_pruned(database_url: str) -> None:
    settings = settings_for(database_url, retention_vacuum=False, retention_interval_s=3600)
    async with pgbatch.App(settings=settings) as app:
        register_noop(app)
        await _finished_batch(app)
        report = await prune_once(app.db, settings, ())
        assert report is not None and report.pruned and report.vacuumed == []
        on = settings.model_copy(update={"retention_vacuum": True})
        report = await prune_once(app.db, on, ())  # nothing left to prune
        assert report is not None and not report.pruned and report.vacuumed == []
        assert await _vacuum_count(app, "shards") == 0


@pytest.mark.asyncio
async def test_a_vacuum_skips_a_locked_table_and_waits_for_no_long_transaction(
    app: pgbatch.App,
) -> None:
    register_noop(app)
    await app.submit("t", range(50), shard_size=1)
    async with (
        app.db.connection() as holder,
        app.db.connection() as reader,
        app.db.connection() as conn,
    ):
        # A session holds the lock every VACUUM needs (as autovacuum or CREATE INDEX
        # CONCURRENTLY would), another an old snapshot (a long report), both left open.
        await holder.execute("BEGIN")
        await holder.execute("LOCK TABLE pgbatch.shards IN SHARE UPDATE EXCLUSIVE MODE")
        await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await reader.execute("SELECT count(*) FROM pgbatch.item_blocks")
        # No session lock_timeout: only vacuum_pruned_tables' own bounds can keep it short.
        await conn.execute("SET lock_timeout = 0")
        vacuumed = await asyncio.wait_for(
            vacuum_pruned_tables(conn, interval_s=0, lock_timeout_ms=50), NO_WAIT_DEADLINE_S
        )
        assert "shards" not in vacuumed  # skipped, for a later pass
        assert {"item_blocks", "batches", "result_blocks"} <= set(vacuumed)
        # The session's own lock_timeout is back for whatever the connection runs next.
        assert await (await conn.execute("SHOW lock_timeout")).fetchone() == ("0",)
        # The claim path never waited either: a claim takes its shards meanwhile.
        claimed = await (
            await conn.execute(
                "UPDATE pgbatch.shards SET status = 'running' WHERE id IN "
                "(SELECT id FROM pgbatch.shards WHERE status = 'queued' LIMIT 5 "
                "FOR UPDATE SKIP LOCKED) RETURNING id"
            )
        ).fetchall()
        assert len(claimed) == 5
        await holder.execute("ROLLBACK")
        await reader.execute("ROLLBACK")


@pytest.mark.asyncio
async def test_vacuum_refuses_a_connection_in_a_transaction(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        await conn.set_autocommit(False)
        try:
            with pytest.raises(ValueError, match="autocommit"):
                await vacuum_pruned_tables(conn, interval_s=0, lock_timeout_ms=50)
        finally:
            await conn.rollback()
            await conn.set_autocommit(True)
