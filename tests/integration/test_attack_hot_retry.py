"""Attack on the deleting completion: a retry of the batch races its last completions.

Shards done with failed items keep their row for the retry; clean ones are deleted by
their completion. Here a retry (batch_requeue_failed_shards) runs while holders delete
their clean shards and zombies flush stale completions (one of a shard still on record,
one claiming "no failed item" for items that failed), all released by one barrier on
separate connections. Afterwards the batch is worked to the end: every item has exactly
one result, the counters equal the results, the batch finishes once, one callback.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import (
    ShardCompletion,
    claim_shards,
    complete_shards,
    rescue_expired_shards,
)
from pgbatch.db.verify import verify_batch
from pgbatch.models import ClaimedShard, ShardStatus
from tests.helpers import register_noop


def _done(shard: ClaimedShard, *, failing: bool = False) -> ShardCompletion:
    outcomes = [
        (i.seq, pgbatch.error("bad") if failing and i.seq % 2 == 0 else pgbatch.ok(i.seq))
        for i in shard.items
    ]
    return ShardCompletion.build(
        shard.id, shard.batch_id, shard.lease_epoch, ShardStatus.DONE, outcomes
    )


async def _claim(conn: psycopg.AsyncConnection[Any], limit: int) -> list[ClaimedShard]:
    shards = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=limit)
    return sorted(shards, key=lambda s: s.id)


@pytest.mark.asyncio
@pytest.mark.parametrize("round_no", range(3))
async def test_retry_racing_the_last_completions_and_zombies_ends_every_item_once(
    app: pgbatch.App, database_url: str, round_no: int
) -> None:
    register_noop(app)
    total = 16
    batch = await app.submit("t", range(total * 2), shard_size=2, on_complete="cb")
    async with app.db.connection() as conn:
        first = await _claim(conn, total)
        # Shards 0-3 end done with failed items (their rows stay, the retry reruns them).
        async with conn.transaction():
            await complete_shards(conn, [_done(s, failing=True) for s in first[:4]])
        # Shards 4-7 are taken over: their first holders become zombies.
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 s'"
            " WHERE id = ANY(%s)",
            ([s.id for s in first[4:8]],),
        )
        assert await rescue_expired_shards(conn) == 4
        holders = await _claim(conn, 4)
    zombies = first[4:8]
    assert [h.id for h in holders] == [z.id for z in zombies]
    # Each flush on its own connection: holders delete clean shards (8-15, 4-6), zombies
    # come with a shard still on record (0: done with failures) and with items that
    # failed reported as none failed (4), a retry reopens the batch meanwhile.
    flushes: list[list[ShardCompletion]] = [[_done(s)] for s in first[8:]]
    flushes += [[_done(h)] for h in holders[:3]]
    flushes.append([_done(first[0]), _done(zombies[0]), _done(holders[3], failing=True)])
    flushes.append([_done(zombies[1]), _done(zombies[2], failing=True)])
    conns = [await psycopg.AsyncConnection.connect(database_url) for _ in flushes]
    barrier = asyncio.Barrier(len(flushes) + 1)

    async def flush(conn: psycopg.AsyncConnection[Any], completions: list[Any]) -> set[Any]:
        await barrier.wait()
        for _ in range(20):  # as the group committer: a deadlock reruns the flush
            try:
                async with conn.transaction():
                    return (await complete_shards(conn, completions)).accepted
            except psycopg.errors.DeadlockDetected:
                continue
        raise AssertionError("flush kept deadlocking")

    async def retry() -> int:
        await barrier.wait()
        if round_no:
            await asyncio.sleep(0.002 * round_no)
        return await app.retry(batch.id)

    try:
        *accepted, requeued = await asyncio.gather(
            *(flush(c, f) for c, f in zip(conns, flushes, strict=True)), retry()
        )
    finally:
        for conn in conns:
            await conn.close()
    won = set().union(*accepted)
    assert won == {(s.id, s.lease_epoch) for s in first[8:] + holders}
    assert requeued >= 4  # shards 0-3 at least; 7 too if its failing holder was first

    # Work the batch to its end, every rerun clean.
    async with app.db.connection() as conn:
        while shards := await _claim(conn, total):
            async with conn.transaction():
                await complete_shards(conn, [_done(s) for s in shards])
        if (await app.get_batch(batch.id)).items_failed:
            # The failing holder of 7 committed after the retry: retry the batch again.
            assert await app.retry(batch.id) == 1
            shards = await _claim(conn, total)
            async with conn.transaction():
                await complete_shards(conn, [_done(s) for s in shards])
        check = await verify_batch(conn, batch.id)
        rows = await (
            await conn.execute(
                "SELECT count(*) FROM pgbatch.shards WHERE batch_id = %s", (batch.id,)
            )
        ).fetchone()
        # One callback per run that finished: each finish inserts its own run_no.
        runs = await (
            await conn.execute(
                "SELECT b.run_no, count(c.*), count(DISTINCT c.run_no), max(c.run_no)"
                " FROM pgbatch.batches b LEFT JOIN pgbatch.callbacks c ON c.batch_id = b.id"
                " WHERE b.id = %s GROUP BY b.run_no",
                (batch.id,),
            )
        ).fetchone()
    final = await app.get_batch(batch.id)
    assert (final.status, final.shards_done, final.shards_dead) == ("succeeded", total, 0)
    assert (final.items_ok, final.items_failed) == (total * 2, 0)
    assert check.every_item_has_one_result and check.results_ok == total * 2
    assert check.shards_open == 0
    assert runs is not None
    run_no, callbacks, distinct_runs, last_run = runs
    assert callbacks == distinct_runs == check.callbacks_inserted and last_run == run_no
    assert callbacks in (1, 2)  # 2: the batch finished, was retried, and finished again
    assert rows == (0,)  # every shard ended clean: none left on record
