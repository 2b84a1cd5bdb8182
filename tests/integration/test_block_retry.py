"""Retries on the block layout (0009): only failed items rerun, into their shard's block.

A retry marks a shard's failed items `retrying`; its rerun merges their new outcomes into
the result block the first run wrote. These tests drive that merge against a zombie of
the same shard (true concurrency), and the two statements that end a retried shard
without running it: a cancel of its batch, and the burial of a shard no claim can read;
and the export of blocks larger than a page of results.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import (
    ShardCompletion,
    bury_shard,
    claim_shards,
    complete_shards,
    rescue_expired_shards,
)
from pgbatch.db.verify import verify_batch
from pgbatch.models import ClaimedShard, ShardStatus

ERRORS = "SELECT seq, error, retrying FROM pgbatch.result_errors WHERE batch_id = %s ORDER BY seq"


def _register(app: pgbatch.App) -> None:
    @app.task(name="odd")  # odd items fail on the first run: a batch to retry
    async def odd(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(i.seq) if i.seq % 2 == 0 else pgbatch.error("odd") for i in items]


async def _failed_then_retried(app: pgbatch.App, shard_size: int = 8) -> pgbatch.Batch:
    """Run a batch of 8 items (the odd ones fail), then retry it: its shards are queued."""
    _register(app)
    batch = await app.submit("odd", range(8), shard_size=shard_size)
    worker = app.worker(concurrency=2)
    running = asyncio.create_task(worker.run())
    try:
        await app.wait(batch.id, timeout_s=30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    assert await app.retry(batch.id) == 8 // shard_size
    return batch


async def _claim(app: pgbatch.App, worker: str, limit: int = 1) -> list[ClaimedShard]:
    async with app.db.connection() as conn:
        return await claim_shards(
            conn, worker_id=worker, queues=["default"], tasks=["odd"], limit=limit
        )


def _rerun(shard: ClaimedShard, writer: str) -> ShardCompletion:
    return ShardCompletion.build(
        shard.id,
        shard.batch_id,
        shard.lease_epoch,
        ShardStatus.DONE,
        [(item.seq, pgbatch.ok(f"{writer} {item.seq}")) for item in shard.items],
    )


@pytest.mark.asyncio
async def test_retried_shards_rerun_only_their_failures_and_zombies_merge_nothing(
    app: pgbatch.App,
) -> None:
    batch = await _failed_then_retried(app, shard_size=2)
    async with app.db.connection() as conn:
        assert await (await conn.execute(ERRORS, (batch.id,))).fetchall() == [
            (seq, "odd", True) for seq in (1, 3, 5, 7)
        ]
    zombies = await _claim(app, "zombie", limit=4)
    assert [[item.seq for item in z.items] for z in zombies] == [[1], [3], [5], [7]]
    async with app.db.connection() as conn:
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 s'"
            " WHERE batch_id = %s",
            (batch.id,),
        )
        assert await rescue_expired_shards(conn) == 4
    holders = await _claim(app, "holder", limit=4)
    assert [[item.seq for item in h.items] for h in holders] == [[1], [3], [5], [7]]

    # Every zombie and every holder completes at once, each on its own connection, so
    # zombies win some of the row locks: only the holders' merges may count.
    completions = [_rerun(z, "zombie") for z in zombies] + [_rerun(h, "holder") for h in holders]
    barrier = asyncio.Barrier(len(completions))

    async def complete(completion: ShardCompletion) -> set[tuple[int, int]]:
        async with await psycopg.AsyncConnection.connect(app.db.url) as conn:
            await barrier.wait()
            async with conn.transaction():
                return (await complete_shards(conn, [completion])).accepted

    accepted = await asyncio.gather(*(complete(c) for c in completions))
    assert accepted == [set()] * 4 + [{(h.id, h.lease_epoch)} for h in holders]
    final = await app.get_batch(batch.id)
    assert (final.status, final.items_ok, final.items_failed) == ("succeeded", 8, 0)
    outputs = [(seq, o.ok, o.output) async for seq, o in app.results(batch.id)]
    assert outputs == [(seq, True, seq if seq % 2 == 0 else f"holder {seq}") for seq in range(8)]
    async with app.db.connection() as conn:
        assert await (await conn.execute(ERRORS, (batch.id,))).fetchall() == []
        assert (await verify_batch(conn, batch.id)).every_item_has_one_result


@pytest.mark.asyncio
async def test_cancelling_a_retried_batch_cancels_only_the_items_being_retried(
    app: pgbatch.App,
) -> None:
    batch = await _failed_then_retried(app)
    assert await app.cancel(batch.id)
    final = await app.get_batch(batch.id)
    assert (final.status, final.items_ok, final.items_failed, final.items_cancelled) == (
        "cancelled", 4, 0, 4,
    )  # fmt: skip
    outputs = [(seq, o.ok, o.output, o.error) async for seq, o in app.results(batch.id)]
    assert outputs == [
        (seq, True, seq, None) if seq % 2 == 0 else (seq, False, None, "cancelled")
        for seq in range(8)
    ]
    async with app.db.connection() as conn:
        assert (await verify_batch(conn, batch.id)).every_item_has_one_result


@pytest.mark.asyncio
async def test_burying_a_retried_shard_fails_only_the_items_being_retried(
    app: pgbatch.App,
) -> None:
    batch = await _failed_then_retried(app)
    async with app.db.connection() as conn:
        [(shard_id,)] = await (
            await conn.execute("SELECT id FROM pgbatch.shards WHERE batch_id = %s", (batch.id,))
        ).fetchall()
        async with conn.transaction():
            assert await bury_shard(conn, shard_id, error="unreadable")
    final = await app.get_batch(batch.id)
    assert (final.status, final.items_ok, final.items_failed) == ("failed", 4, 4)
    outputs = [(seq, o.ok, o.error) async for seq, o in app.results(batch.id)]
    assert outputs == [
        (seq, True, None) if seq % 2 == 0 else (seq, False, "unreadable") for seq in range(8)
    ]
    async with app.db.connection() as conn:
        check = await verify_batch(conn, batch.id)
        assert check.every_item_has_one_result and check.results_ok == 4


@pytest.mark.asyncio
async def test_results_of_shards_larger_than_a_page_come_back_whole_and_in_order(
    app: pgbatch.App,
) -> None:
    # A page of App.results reads whole blocks: shards of 12,000 items and 10,000-item
    # pages, with the last shard short, still give every item once, in order.
    _register(app)
    batch = await app.submit("odd", range(30_000), shard_size=12_000)
    worker = app.worker(concurrency=3)
    running = asyncio.create_task(worker.run())
    try:
        await app.wait(batch.id, timeout_s=60)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    results = [(seq, o.ok, o.output) async for seq, o in app.results(batch.id)]
    assert results == [
        (seq, True, seq) if seq % 2 == 0 else (seq, False, None) for seq in range(30_000)
    ]
    failed = [seq async for seq, _ in app.results(batch.id, errors_only=True)]
    assert failed == list(range(1, 30_000, 2))
