"""Invariants 2 and 3: fenced completion, and a batch counted and finished exactly once."""

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
from pgbatch.models import ClaimedShard, ShardStatus, TableRows
from tests.helpers import register_noop

WRITERS = "SELECT writer, count(*) FROM side_effects GROUP BY 1 ORDER BY 1"


def _completion(shard: ClaimedShard, writer: str) -> ShardCompletion:
    return ShardCompletion.build(
        shard.id,
        shard.batch_id,
        shard.lease_epoch,
        ShardStatus.DONE,
        [(item.seq, pgbatch.ok(writer)) for item in shard.items],
        [TableRows("side_effects", ("seq", "writer"), [(i.seq, writer) for i in shard.items])],
    )


async def _claim(
    conn: psycopg.AsyncConnection[Any], worker: str, limit: int = 1
) -> list[ClaimedShard]:
    return await claim_shards(conn, worker_id=worker, queues=["default"], tasks=["t"], limit=limit)


async def _complete(app: pgbatch.App, completions: list[ShardCompletion]) -> Any:
    async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
        return await complete_shards(conn, completions)

    return await app.db.run_in_transaction(work)


async def _expire_all(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 second'"
            " WHERE status = 'running'"
        )
        assert await rescue_expired_shards(conn) >= 1


@pytest.mark.asyncio
async def test_zombie_completion_is_rejected_and_writes_nothing(app: pgbatch.App) -> None:
    register_noop(app)
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE side_effects (seq bigint, writer text)")
    batch = await app.submit("t", range(5), shard_size=5, on_complete="cb")
    async with app.db.connection() as conn:
        [zombie_view] = await _claim(conn, "A")
        await _expire_all(app)
        [b_view] = await _claim(conn, "B")
    assert b_view.lease_epoch == zombie_view.lease_epoch + 1
    assert (await _complete(app, [_completion(b_view, "B")])).accepted == {
        (b_view.id, b_view.lease_epoch)
    }
    report = await _complete(app, [_completion(zombie_view, "A")])
    assert report.accepted == set()
    async with app.db.connection() as conn:
        writers = await (await conn.execute("SELECT DISTINCT writer FROM side_effects")).fetchall()
        outputs = await (
            await conn.execute("SELECT DISTINCT output::text FROM pgbatch.results")
        ).fetchall()
        count = await (await conn.execute("SELECT count(*) FROM side_effects")).fetchone()
    assert writers == [("B",)] and outputs == [('"B"',)] and count == (5,)
    final = await app.get_batch(batch.id)
    assert (final.items_ok, final.shards_done, final.status) == (5, 1, "succeeded")


@pytest.mark.asyncio
async def test_zombie_that_completes_first_after_takeover_is_still_fenced(app: pgbatch.App) -> None:
    register_noop(app)
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE side_effects (seq bigint, writer text)")
    await app.submit("t", range(3), shard_size=3)
    async with app.db.connection() as conn:
        [zombie_view] = await _claim(conn, "A")
        await _expire_all(app)
        [b_view] = await _claim(conn, "B")
    # A finishes before B does: the takeover alone must fence it.
    assert (await _complete(app, [_completion(zombie_view, "A")])).accepted == set()
    assert (await _complete(app, [_completion(b_view, "B")])).accepted == {
        (b_view.id, b_view.lease_epoch)
    }
    async with app.db.connection() as conn:
        rows = await (
            await conn.execute("SELECT writer, count(*) FROM side_effects GROUP BY 1")
        ).fetchall()
    assert rows == [("B", 3)]


@pytest.mark.asyncio
async def test_a_fenced_out_shard_does_not_spoil_its_flush(app: pgbatch.App) -> None:
    register_noop(app)
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE side_effects (seq bigint, writer text)")
    await app.submit("t", range(4), shard_size=1)
    async with app.db.connection() as conn:
        [stale] = await _claim(conn, "A")
        await _expire_all(app)
        fresh = await _claim(conn, "B", limit=4)
    report = await _complete(app, [_completion(stale, "A"), *(_completion(s, "B") for s in fresh)])
    assert report.accepted == {(s.id, s.lease_epoch) for s in fresh}
    async with app.db.connection() as conn:
        rows = await (
            await conn.execute("SELECT writer, count(*) FROM side_effects GROUP BY 1")
        ).fetchall()
    assert rows == [("B", 4)]


def _retry(shard: ClaimedShard, error: str, delay_s: float = 60.0) -> ShardCompletion:
    return ShardCompletion.retry(
        shard.id, shard.batch_id, shard.lease_epoch, delay_s=delay_s, error=error
    )


def _dead(shard: ClaimedShard, error: str) -> ShardCompletion:
    failure = pgbatch.Outcome(False, None, error)
    return ShardCompletion.build(
        shard.id,
        shard.batch_id,
        shard.lease_epoch,
        ShardStatus.DEAD,
        [(i.seq, failure) for i in shard.items],
        error=error,
    )


@pytest.mark.asyncio
async def test_one_flush_writes_done_dead_and_retried_shards_and_fences_a_zombie_retry(
    app: pgbatch.App,
) -> None:
    register_noop(app)
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE side_effects (seq bigint, writer text)")
    batch = await app.submit("t", range(4), shard_size=1)
    async with app.db.connection() as conn:
        [stale] = await _claim(conn, "A")
        await _expire_all(app)
        fresh = await _claim(conn, "B", limit=4)
    [first, second, third, fourth] = sorted(fresh, key=lambda s: s.id)
    assert first.id == stale.id and first.lease_epoch == stale.lease_epoch + 1
    report = await _complete(
        app,
        [
            _retry(stale, "zombie"),  # the lease it names was taken over: fenced out
            _completion(first, "B"),
            _dead(second, "failed after 1 attempts: boom"),
            _retry(third, "boom"),
            _retry(fourth, "boom"),
        ],
    )
    assert report.accepted == {(s.id, s.lease_epoch) for s in fresh}
    assert report.finished_batches == []
    async with app.db.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT id, status, last_error, attempts, worker_id IS NULL,"
                " finished_at IS NULL, lease_expires_at IS NULL,"
                " run_after > now() + interval '30 seconds'"
                " FROM pgbatch.shards WHERE batch_id = %s ORDER BY id",
                (batch.id,),
            )
        ).fetchall()
        results = await (
            await conn.execute(
                "SELECT seq, ok FROM pgbatch.results WHERE batch_id = %s ORDER BY seq",
                (batch.id,),
            )
        ).fetchall()
    # The clean done shard is gone (its result and the counters say it ended); the requeued
    # shards keep the attempt the claim counted and wait for their backoff.
    assert rows == [
        (second.id, "dead", "failed after 1 attempts: boom", 1, False, False, True, False),
        (third.id, "queued", "boom", 1, True, True, True, True),
        (fourth.id, "queued", "boom", 1, True, True, True, True),
    ]
    assert results == [(first.items[0].seq, True), (second.items[0].seq, False)]
    progress = await app.get_batch(batch.id)
    assert (progress.shards_done, progress.items_ok, progress.items_failed) == (2, 1, 1)
    assert progress.status == "running"


@pytest.mark.asyncio
async def test_a_flush_of_retries_only_leaves_the_batch_row_alone(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    batch = await app.submit("t", range(2), shard_size=1)
    async with app.db.connection() as conn:
        shards = await _claim(conn, "A", limit=2)
    before = await app.get_batch(batch.id)
    # A session holds the batch row: a retry flush that locked it would wait and time out.
    holder = await psycopg.AsyncConnection.connect(database_url)
    try:
        await holder.execute("SELECT 1 FROM pgbatch.batches WHERE id = %s FOR UPDATE", (batch.id,))

        async def work(conn: psycopg.AsyncConnection[Any]) -> Any:
            await conn.execute("SET LOCAL lock_timeout = '200ms'")
            return await complete_shards(conn, [_retry(s, "boom") for s in shards])

        report = await app.db.run_in_transaction(work)
    finally:
        await holder.close()
    assert report.accepted == {(s.id, s.lease_epoch) for s in shards}
    after = await app.get_batch(batch.id)
    assert (after.shards_done, after.version) == (0, before.version)


@pytest.mark.asyncio
async def test_concurrent_fan_in_counts_exactly_and_finishes_once(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE side_effects (seq bigint, writer text)")
    total = 240
    batch = await app.submit("t", range(total), shard_size=1, on_complete="cb")
    async with app.db.connection() as conn:
        shards = await _claim(conn, "W", limit=total)
    assert len(shards) == total
    connections = 16
    conns = [
        await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        for _ in range(connections)
    ]
    barrier = asyncio.Barrier(connections)

    async def completer(index: int) -> list[Any]:
        conn = conns[index]
        await barrier.wait()
        reports = []
        # Each connection commits its share one shard per transaction: the most
        # contention the batch row can see.
        for shard in shards[index::connections]:
            async with conn.transaction():
                reports.append(await complete_shards(conn, [_completion(shard, "W")]))
        return reports

    try:
        reports = [
            r for rs in await asyncio.gather(*map(completer, range(connections))) for r in rs
        ]
    finally:
        for conn in conns:
            await conn.close()
    assert sum(len(r.accepted) for r in reports) == total
    assert sum(len(r.finished_batches) for r in reports) == 1
    assert sum(len(r.callbacks_inserted) for r in reports) == 1
    final = await app.get_batch(batch.id)
    assert (final.shards_done, final.items_ok, final.status) == (total, total, "succeeded")

    # A replayed completion of an already-completed shard changes nothing.
    replay = await _complete(app, [_completion(shards[0], "W")])
    assert replay.accepted == set() and replay.finished_batches == []
    again = await app.get_batch(batch.id)
    assert (again.shards_done, again.items_ok, again.version) == (total, total, final.version)
    async with app.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT (SELECT count(*) FROM pgbatch.callbacks WHERE batch_id = %(b)s),"
                " (SELECT count(*) FROM pgbatch.results WHERE batch_id = %(b)s),"
                " (SELECT count(*) FROM side_effects)",
                {"b": batch.id},
            )
        ).fetchone()
    assert row == (1, total, total)
