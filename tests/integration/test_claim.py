"""Invariant 1: under true concurrency no shard is ever held by two workers."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import claim_shards
from tests.helpers import register_noop

CLAIMERS_AT_ONCE = 32


async def _connections(url: str, count: int) -> list[psycopg.AsyncConnection[Any]]:
    return list(
        await asyncio.gather(
            *(psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(count))
        )
    )


async def _race(url: str, claim: Any, count: int = CLAIMERS_AT_ONCE) -> list[list[tuple[int, int]]]:
    """Open `count` connections, release them together on a barrier, each claiming once."""
    conns = await _connections(url, count)
    barrier = asyncio.Barrier(count)

    async def one(conn: psycopg.AsyncConnection[Any]) -> list[tuple[int, int]]:
        await barrier.wait()
        return await claim(conn)

    try:
        return list(await asyncio.gather(*(one(c) for c in conns)))
    finally:
        for conn in conns:
            await conn.close()


async def _real_claim(conn: psycopg.AsyncConnection[Any]) -> list[tuple[int, int]]:
    shards = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=1)
    return [(s.id, s.lease_epoch) for s in shards]


async def _read_then_write_claim(conn: psycopg.AsyncConnection[Any]) -> list[tuple[int, int]]:
    """A deliberately broken claim: it reads, then writes, with no lock between the two."""
    row = await (
        await conn.execute("SELECT id FROM pgbatch.shards WHERE status = 'queued' LIMIT 1")
    ).fetchone()
    if row is None:
        return []
    await conn.execute("SELECT pg_sleep(0.05)")  # widen the window every concurrent claim races in
    cur = await conn.execute(
        "UPDATE pgbatch.shards SET status = 'running', lease_epoch = lease_epoch + 1"
        " WHERE id = %s RETURNING id, lease_epoch",
        (row[0],),
    )
    return [tuple(r) for r in await cur.fetchall()]  # type: ignore[misc]


@pytest.mark.asyncio
async def test_32_claimers_released_together_one_wins(app: pgbatch.App, database_url: str) -> None:
    register_noop(app)
    await app.submit("t", [1])
    results = await _race(database_url, _real_claim)
    winners = [claimed for claimed in results if claimed]
    assert len(winners) == 1
    assert winners[0][0][1] == 1  # the first claim sets epoch 1


@pytest.mark.asyncio
async def test_the_race_harness_catches_a_read_then_write_claim(
    app: pgbatch.App, database_url: str
) -> None:
    """The same harness on a broken claim must see several winners, or it proves nothing."""
    register_noop(app)
    await app.submit("t", [1])
    results = await _race(database_url, _read_then_write_claim)
    assert len([claimed for claimed in results if claimed]) > 1


@pytest.mark.asyncio
async def test_8_claimers_over_2000_shards_never_claim_one_twice(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    batch = await app.submit("t", range(2000), shard_size=1)
    conns = await _connections(database_url, 8)
    barrier = asyncio.Barrier(len(conns))
    rng = random.Random(7)

    async def claimer(conn: psycopg.AsyncConnection[Any]) -> list[int]:
        mine: list[int] = []
        await barrier.wait()
        while True:
            shards = await claim_shards(
                conn, worker_id=str(id(conn)), queues=["default"], tasks=["t"],
                limit=rng.randint(1, 16),
            )  # fmt: skip
            if not shards:
                return mine
            mine.extend(s.id for s in shards)

    try:
        per_claimer = await asyncio.gather(*(claimer(c) for c in conns))
    finally:
        for conn in conns:
            await conn.close()
    counts = Counter(shard for claimed in per_claimer for shard in claimed)
    assert len(counts) == batch.total_shards == 2000
    assert max(counts.values()) == 1
    assert sum(1 for claimed in per_claimer if claimed) > 1  # the work really was shared
    async with app.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT count(*), max(lease_epoch) FROM pgbatch.shards WHERE status = 'running'"
            )
        ).fetchone()
    assert row == (2000, 1)


@pytest.mark.asyncio
async def test_claim_respects_priority_queue_and_limit(app: pgbatch.App) -> None:
    register_noop(app)

    @app.task(name="other", queue="other")
    async def other(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok() for _ in items]

    low = await app.submit("t", range(3), shard_size=1, priority=0)
    high = await app.submit("t", range(3), shard_size=1, priority=5)
    await app.submit("other", range(3), shard_size=1)
    async with app.db.connection() as conn:
        first = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=4)
        rest = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=10)
    # Selection follows priority; the rows come back in shard order.
    assert sorted(s.batch_id for s in first) == sorted([high.id] * 3 + [low.id])
    assert [s.batch_id for s in rest] == [low.id] * 2  # the other queue is not served
    assert all(s.items and s.attempts == 1 for s in first + rest)


@pytest.mark.asyncio
async def test_the_first_claim_starts_the_batch_once(app: pgbatch.App) -> None:
    register_noop(app)
    batch = await app.submit("t", range(4), shard_size=1)
    assert (batch.status, batch.started_at) == (pgbatch.BatchStatus.PENDING, None)
    async with app.db.connection() as conn:
        first = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=1)
        started = await app.get_batch(batch.id)
        more = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=3)
    again = await app.get_batch(batch.id)
    assert (len(first), len(more)) == (1, 3)
    assert started.status is pgbatch.BatchStatus.RUNNING
    assert started.started_at is not None
    # Started once: later claims neither move the version nor the start time.
    assert (again.version, again.started_at) == (started.version, started.started_at)
    assert started.version == batch.version + 1
