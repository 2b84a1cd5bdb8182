"""Attack on the completion handover: a worker stops while handed-over completions wait.

Finished shards go to the completer without a task (complete_nowait); the worker's drain
must still wait for them. Here the completer is stalled on the batch row with the
worker holding its MAX_HELD_PER_SLOT bound, the worker is asked to stop, and the stalled
flush's backend is killed (the completer's rerun of a lost connection). Nothing may be
lost: the worker stops, every shard is completed or released, and a second worker
finishes the batch with exactly one result per item and counters equal to the results.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from pgbatch.engine.worker import MAX_HELD_PER_SLOT
from tests.helpers import wait_until

CONCURRENCY = 4
SHARDS = 120


@pytest.mark.asyncio
@pytest.mark.parametrize("kill_flush", [False, True])
async def test_stop_with_handed_over_completions_stalled_loses_nothing(
    app: pgbatch.App, database_url: str, kill_flush: bool
) -> None:
    gate = asyncio.Event()

    @app.task(name="gated", lease_ttl_s=30)
    async def gated(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        await gate.wait()
        return [pgbatch.ok(i.value) for i in items]

    @app.callback(name="cb")
    async def cb(b: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        return None

    batch = await app.submit("gated", range(SHARDS), shard_size=1, on_complete="cb")

    worker = app.worker(concurrency=CONCURRENCY)
    task = asyncio.create_task(worker.run())
    blocker = await psycopg.AsyncConnection.connect(database_url)
    try:

        async def started() -> bool:
            return (await app.get_batch(batch.id)).status == "running"

        await wait_until(started, 30)
        await blocker.execute("SELECT 1 FROM pgbatch.batches WHERE id = %s FOR SHARE", (batch.id,))
        gate.set()

        def parked() -> bool:
            return (
                worker._handlers_running == 0
                and worker._handed_over > 0
                and len(worker._active) == MAX_HELD_PER_SLOT * CONCURRENCY
            )

        await wait_until(parked, 30)
        worker.request_stop()
        await asyncio.sleep(0.2)  # the drain is now waiting on the handed-over completions
        assert not task.done()
        if kill_flush:
            # The completer's flush waits on the batch row: kill its backend, as a restart.
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
                pid = blocker.info.backend_pid
                rows = await (
                    await c.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                        " WHERE %s = ANY(pg_blocking_pids(pid))",
                        (pid,),
                    )
                ).fetchall()
            assert rows
        await blocker.rollback()
        await asyncio.wait_for(task, 30)
    finally:
        gate.set()
        await blocker.close()
        if not task.done():
            worker.request_stop()
            await asyncio.wait_for(task, 30)

    async with app.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FROM pgbatch.shards WHERE batch_id = %s AND status = 'running'",
                (batch.id,),
            )
        ).fetchone()
    assert row == (0,)  # nothing left holding a lease: completed or released
    mid = await app.get_batch(batch.id)
    # Each handed-over completion was written (its flush rerun after the kill) and counted.
    assert mid.shards_done == worker.stats.shards_completed >= MAX_HELD_PER_SLOT * CONCURRENCY

    second = app.worker(concurrency=CONCURRENCY)
    again = asyncio.create_task(second.run())
    try:

        async def finished() -> bool:
            return (await app.get_batch(batch.id)).finished_at is not None

        await wait_until(finished, 30)
    finally:
        second.request_stop()
        await asyncio.wait_for(again, 30)
    final = await app.get_batch(batch.id)
    assert (final.status, final.shards_done, final.items_ok) == ("succeeded", SHARDS, SHARDS)
    async with app.db.connection() as conn:
        check = await verify_batch(conn, batch.id)
    assert check.every_item_has_one_result and check.results_ok == SHARDS
    assert (check.shards_open, check.callbacks_inserted) == (0, 1)
    outputs = [(seq, o.output) async for seq, o in app.results(batch.id)]
    assert outputs == [(seq, seq) for seq in range(SHARDS)]
