"""pgbatch.Snooze: a handler puts its shard back for a while, attempt not charged, fenced."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.queries import query
from pgbatch.db.shards import (
    CommitStatement,
    ShardCompletion,
    claim_shards,
    complete_shards,
    rescue_expired_shards,
)
from tests.helpers import fetch_one, register_noop


@pytest.mark.asyncio
async def test_a_snoozed_shard_is_requeued_without_spending_attempts(
    app: pgbatch.App, database_url: str
) -> None:
    """max_attempts=1 and three snoozes: charged, the shard would be dead after the first."""
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE snoozes (attempt int)")
    calls = 0

    @app.task("sleepy", max_attempts=1, shard_size=10)
    async def sleepy(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        nonlocal calls
        calls += 1
        if calls <= 3:
            # Committed with the snooze, as a rate limiter gives back what it reserved.
            ctx.execute_at_commit("INSERT INTO snoozes VALUES (%s)", (ctx.attempt,))
            raise pgbatch.Snooze(0.05, "limit spent")
        return [pgbatch.ok(ctx.attempt) for _ in items]

    batch = await app.submit("sleepy", range(3))
    worker = app.worker(concurrency=2)
    running = asyncio.create_task(worker.run())
    try:
        done = await app.wait(batch.id, timeout_s=30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    assert (done.status, done.items_ok, calls) == ("succeeded", 3, 4)
    assert worker.stats.shards_snoozed == 3
    # Every run saw attempt 1: each snooze gave its claim's attempt back.
    outputs = [outcome.output async for _, outcome in app.results(batch.id)]
    assert outputs == [1, 1, 1]
    assert await fetch_one(database_url, "SELECT array_agg(attempt) FROM snoozes") == ([1, 1, 1],)
    # Done with no failed item, the shard's row is gone: its outputs above carry the attempt.
    rows = await fetch_one(
        database_url, "SELECT count(*) FROM pgbatch.shards WHERE batch_id = %s", (batch.id,)
    )
    assert rows == (0,)


async def _complete(app: pgbatch.App, completions: list[ShardCompletion]) -> Any:
    async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
        return await complete_shards(conn, completions)

    return await app.db.run_in_transaction(work)


@pytest.mark.asyncio
async def test_a_snooze_from_a_lost_lease_does_nothing(app: pgbatch.App, database_url: str) -> None:
    register_noop(app)
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE given_back (epoch int)")
    await app.submit("t", range(2), shard_size=2)
    async with app.db.connection() as conn:
        [zombie] = await claim_shards(conn, worker_id="A", queues=["default"], tasks=["t"], limit=1)
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 second'"
        )
        assert await rescue_expired_shards(conn) == 1
        [owner] = await claim_shards(conn, worker_id="B", queues=["default"], tasks=["t"], limit=1)
    assert owner.lease_epoch == zombie.lease_epoch + 1
    before = await fetch_one(
        database_url, "SELECT attempts FROM pgbatch.shards WHERE id = %s", (owner.id,)
    )
    give_back = CommitStatement("INSERT INTO given_back VALUES (%s)", (zombie.lease_epoch,))
    report = await _complete(
        app,
        [
            ShardCompletion.snooze(
                zombie.id, zombie.batch_id, zombie.lease_epoch, delay_s=60, reason="zombie",
                statements=[give_back],
            )
        ],
    )  # fmt: skip
    assert report.accepted == set()
    row = await fetch_one(
        database_url,
        "SELECT status, lease_epoch, attempts, worker_id FROM pgbatch.shards WHERE id = %s",
        (owner.id,),
    )
    assert row == ("running", owner.lease_epoch, before[0], "B")
    assert await fetch_one(database_url, "SELECT count(*) FROM given_back") == (0,)


@pytest.mark.asyncio
async def test_the_refund_names_the_epoch_it_was_claimed_with(
    app: pgbatch.App, database_url: str
) -> None:
    """The refund statement alone, replayed under an old epoch, changes no attempt."""
    register_noop(app)
    await app.submit("t", range(1), shard_size=1)
    async with app.db.connection() as conn:
        [shard] = await claim_shards(conn, worker_id="A", queues=["default"], tasks=["t"], limit=1)
        await conn.execute("UPDATE pgbatch.shards SET status = 'queued'")
        await conn.execute(
            query("shard_snooze_refund"), {"shard_id": shard.id, "epoch": shard.lease_epoch - 1}
        )
    assert await fetch_one(
        database_url, "SELECT attempts FROM pgbatch.shards WHERE id = %s", (shard.id,)
    ) == (1,)


@pytest.mark.asyncio
async def test_a_snooze_while_poison_items_are_isolated_puts_the_whole_shard_back(
    app: pgbatch.App, database_url: str
) -> None:
    """A part run that snoozes ends the isolation: the shard waits whole, nothing is kept."""
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE part_writes (seq int)")
    runs: list[int] = []

    @app.task("limited", max_attempts=1, shard_size=4)
    async def limited(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        runs.append(len(items))
        for item in items:
            ctx.execute_at_commit("INSERT INTO part_writes VALUES (%s)", (item.seq,))
        if len(runs) == 1:
            raise pgbatch.NonRetryableError("the whole shard fails once")
        if len(runs) == 2:
            raise pgbatch.Snooze(0.05, "limit spent")  # the first half, while isolating
        return [pgbatch.ok(item.value) for item in items]

    batch = await app.submit("limited", range(4))
    worker = app.worker(concurrency=1)
    running = asyncio.create_task(worker.run())
    try:
        done = await app.wait(batch.id, timeout_s=30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    # Claimed again after the snooze (attempt refunded despite max_attempts=1), the whole
    # shard ran once more and succeeded; without the snooze path the half was poison.
    assert (done.status, done.items_ok, done.items_failed) == ("succeeded", 4, 0)
    assert runs[:2] == [4, 2] and runs[2] == 4
    assert worker.stats.shards_snoozed == 1
    rows = await fetch_one(database_url, "SELECT array_agg(seq ORDER BY seq) FROM part_writes")
    assert rows == ([0, 1, 2, 3],)
