"""End-to-end: a worker in this process processes a batch and the callback runs once."""

from __future__ import annotations

import asyncio

import pytest

import pgbatch
from tests.helpers import wait_until


@pytest.mark.asyncio
async def test_batch_runs_to_completion_with_user_rows_and_callback(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE doubled (seq bigint PRIMARY KEY, v bigint)")

    @app.task(shard_size=7)
    async def double(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        ctx.copy_rows("doubled", [(i.seq, i.value * 2) for i in items], columns=("seq", "v"))
        return [pgbatch.ok(i.value * 2) if i.value % 10 else pgbatch.error("ten") for i in items]

    ran: list[int] = []

    @app.callback()
    async def finished(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        ran.append(batch.id)

    batch = await app.submit("double", range(100), on_complete="finished")
    assert batch.total_shards == 15
    worker = app.worker(concurrency=4)
    running = asyncio.create_task(worker.run())
    done = await app.wait(batch.id, timeout_s=30)

    async def callback_ran() -> bool:
        return bool(ran)

    await wait_until(callback_ran, 20)
    worker.request_stop()
    await running
    assert done.status is pgbatch.BatchStatus.SUCCEEDED
    assert (done.items_ok, done.items_failed, done.shards_done) == (90, 10, 15)
    assert ran == [batch.id]
    async with app.db.connection() as conn:
        row = await (await conn.execute("SELECT count(*), sum(v) FROM doubled")).fetchone()
    assert row == (100, sum(range(100)) * 2)
    results = [(seq, o.ok) async for seq, o in app.results(batch.id)]
    assert [seq for seq, _ in results] == list(range(100))
