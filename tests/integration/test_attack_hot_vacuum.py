"""Attack on the pruner's VACUUM: passes that vacuum while a worker drains a batch and a
long transaction holds an old snapshot. No pass may fail or wait for the transaction, and
the running batch must end with every item's result once."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from pgbatch.engine.pruner import prune_once
from tests.conftest import settings_for
from tests.helpers import register_noop

# A deadline for a call that must not wait on a lock, not a measure of its speed.
NO_WAIT_DEADLINE_S = 30.0
SHARDS = 1500


@pytest.mark.asyncio
async def test_vacuums_while_a_worker_runs_and_a_long_transaction_is_open(
    database_url: str,
) -> None:
    settings = settings_for(database_url, retention_vacuum_interval_s=0, retention_interval_s=3600)
    async with (
        pgbatch.App(settings=settings) as app,
        await psycopg.AsyncConnection.connect(database_url) as long_tx,
    ):
        register_noop(app)

        @app.task(name="slow")
        async def slow(
            items: list[pgbatch.Item], ctx: pgbatch.ShardContext
        ) -> list[pgbatch.Outcome]:
            await asyncio.sleep(0.01)
            return [pgbatch.ok() for _ in items]

        main = await app.submit("slow", range(SHARDS), shard_size=1)
        await long_tx.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await long_tx.execute("SELECT count(*) FROM pgbatch.shards")  # holds its snapshot
        worker = app.worker(concurrency=8)
        task = asyncio.create_task(worker.run())
        vacuumed = 0
        running_during_vacuum = False
        try:
            for _ in range(4):
                small = await app.submit("t", range(10), shard_size=1, retention_s=0, priority=9)
                try:
                    await app.wait(small.id, timeout_s=30)
                except pgbatch.BatchPrunedError:
                    pass
                report = await asyncio.wait_for(
                    prune_once(app.db, settings, ()), NO_WAIT_DEADLINE_S
                )
                assert report is not None
                vacuumed += len(report.vacuumed)
                running_during_vacuum |= (await app.get_batch(main.id)).finished_at is None
            await long_tx.rollback()
            final = await app.wait(main.id, timeout_s=60)
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)
        assert vacuumed > 0 and running_during_vacuum
        assert (final.status, final.items_ok) == ("succeeded", SHARDS)
        async with app.db.connection() as conn:
            check = await verify_batch(conn, main.id)
        assert check.every_item_has_one_result and check.shards_open == 0
