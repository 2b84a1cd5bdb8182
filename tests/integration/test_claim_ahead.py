"""A worker's claims run ahead of its commits by at most one slot's worth of shards each.

Issue 13: once a claim cost a few milliseconds, a worker whose completer fell behind
refilled every slot its handlers freed at once, and thousands of shards per worker waited
for their completion (their leases renewed by every heartbeat, while the other workers
found the queue empty).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.engine.worker import MAX_HELD_PER_SLOT
from tests.helpers import wait_until

CONCURRENCY = 4
SHARDS = 200


async def _running_shards(app: pgbatch.App) -> int:
    async with app.db.connection() as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM pgbatch.shards WHERE status = 'running'")
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.asyncio
async def test_a_stalled_completer_stops_the_claims(app: pgbatch.App, database_url: str) -> None:
    gate = asyncio.Event()

    @app.task(name="gated")
    async def gated(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        await gate.wait()
        return [pgbatch.ok() for _ in items]

    batch = await app.submit("gated", range(SHARDS), shard_size=1)
    worker = app.worker(concurrency=CONCURRENCY)
    task = asyncio.create_task(worker.run())
    blocker: psycopg.AsyncConnection[Any] | None = None
    try:

        async def started() -> bool:
            return (await app.get_batch(batch.id)).status == "running"

        await wait_until(started, 30)
        # Every completion flush now waits on the batch row: the completer is stalled.
        blocker = await psycopg.AsyncConnection.connect(database_url)
        await blocker.execute("SELECT 1 FROM pgbatch.batches WHERE id = %s FOR SHARE", (batch.id,))
        gate.set()
        held = MAX_HELD_PER_SLOT * CONCURRENCY

        def claims_parked() -> bool:
            # Every handler is done and the claim loop waits for a held shard to leave,
            # not for a slot: a state the loop only reaches when claims stop ahead of
            # the commits (without the bound it claims the whole batch instead).
            return (
                worker._handlers_running == 0
                and not worker._slot_freed.is_set()
                and len(worker._active) == held
            )

        await wait_until(claims_parked, 30)
        assert await _running_shards(app) == held
        await blocker.rollback()

        async def finished() -> bool:
            return (await app.get_batch(batch.id)).finished_at is not None

        await wait_until(finished, 60)
        final = await app.get_batch(batch.id)
        assert final.items_ok == SHARDS
    finally:
        gate.set()
        if blocker is not None:
            await blocker.close()
        worker.request_stop()
        await asyncio.wait_for(task, 30)
