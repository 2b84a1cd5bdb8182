"""Attack on the completion's lock order: a zombie's flush and a cancel of its batch.

Cancel locks the batch row, then its queued shards. A completion flush locks its shards,
then the batch row. A zombie's outcome names a shard that was rescued and is queued
again: had the flush locked that row anyway, the two would wait for each other (a
deadlock, one side aborted after deadlock_timeout).
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db import batches as batch_queries
from pgbatch.db.shards import (
    ShardCompletion,
    bury_shard,
    claim_shards,
    complete_shards,
    rescue_expired_shards,
)
from pgbatch.db.verify import verify_batch
from pgbatch.models import ClaimedShard, ShardStatus
from tests.helpers import register_noop, wait_until


def _done(shard: ClaimedShard) -> ShardCompletion:
    outcomes = [(i.seq, pgbatch.ok(i.seq)) for i in shard.items]
    return ShardCompletion.build(
        shard.id, shard.batch_id, shard.lease_epoch, ShardStatus.DONE, outcomes
    )


@pytest.mark.asyncio
async def test_a_zombie_flush_and_a_cancel_of_its_batch_do_not_deadlock(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    batch = await app.submit("t", range(3), shard_size=1)
    async with app.db.connection() as conn:
        claimed = sorted(
            await claim_shards(conn, worker_id="z", queues=["default"], tasks=["t"], limit=3),
            key=lambda s: s.id,
        )
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 s' WHERE id = %s",
            (claimed[0].id,),
        )
        assert await rescue_expired_shards(conn) == 1  # shard 0 is queued again
    zombie, holder = claimed[0], claimed[1]
    async with (
        await psycopg.AsyncConnection.connect(database_url) as canceller,
        await psycopg.AsyncConnection.connect(database_url) as flusher,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as observer,
    ):
        await canceller.execute("SET deadlock_timeout = '100ms'")
        await flusher.execute("SET deadlock_timeout = '100ms'")
        await canceller.execute(
            "UPDATE pgbatch.batches SET version = version + 1 WHERE id = %s", (batch.id,)
        )
        flush = asyncio.create_task(complete_shards(flusher, [_done(zombie), _done(holder)]))
        pid = canceller.info.backend_pid

        async def flush_waits_on_the_batch() -> bool:
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (pid,),
            )
            row = await cur.fetchone()
            return bool(row and row[0])

        await wait_until(flush_waits_on_the_batch, 10)
        # The cancel goes on to the queued shards, the zombie's among them.
        assert await batch_queries.cancel_batch(canceller, batch.id)
        await canceller.commit()
        report = await asyncio.wait_for(flush, 10)
        await flusher.commit()
    assert report.accepted == {(holder.id, holder.lease_epoch)}
    async with app.db.connection() as conn:
        check = await verify_batch(conn, batch.id)
    final = await app.get_batch(batch.id)
    assert (final.status, final.shards_done, final.items_ok, final.items_cancelled) == (
        "cancelled",
        2,
        1,
        1,
    )
    assert check.results == 2 and check.shards_open == 1  # shard 2 still runs


@pytest.mark.asyncio
async def test_a_bury_and_a_cancel_of_its_batch_do_not_deadlock(
    app: pgbatch.App, database_url: str
) -> None:
    """A bury (issue 9) locked its queued shard, then the batch row: a cancel holding the
    batch row and going for its queued shards closed a cycle with it."""
    register_noop(app)
    batch = await app.submit("t", range(2), shard_size=1)
    async with app.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT min(id) FROM pgbatch.shards WHERE batch_id = %s", (batch.id,)
            )
        ).fetchone()
    assert row is not None
    async with (
        await psycopg.AsyncConnection.connect(database_url) as canceller,
        await psycopg.AsyncConnection.connect(database_url) as burier,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as observer,
    ):
        await canceller.execute("SET deadlock_timeout = '100ms'")
        await burier.execute("SET deadlock_timeout = '100ms'")
        await canceller.execute(
            "UPDATE pgbatch.batches SET version = version + 1 WHERE id = %s", (batch.id,)
        )
        bury = asyncio.create_task(bury_shard(burier, row[0], error="unreadable"))
        pid = canceller.info.backend_pid

        async def bury_waits() -> bool:
            cur = await observer.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
                (pid,),
            )
            found = await cur.fetchone()
            return bool(found and found[0])

        await wait_until(bury_waits, 10)
        assert await batch_queries.cancel_batch(canceller, batch.id)
        await canceller.commit()
        assert await asyncio.wait_for(bury, 10) is False  # the cancel got the shard first
        await burier.commit()
    final = await app.get_batch(batch.id)
    assert (final.status, final.shards_done, final.items_cancelled) == ("cancelled", 2, 2)
    async with app.db.connection() as conn:
        check = await verify_batch(conn, batch.id)
    assert check.every_item_has_one_result and check.shards_open == 0
