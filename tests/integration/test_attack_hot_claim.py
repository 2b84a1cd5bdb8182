"""Attack on the ctid claim: concurrent set_priority, cancel and rescue move queued rows.

The claim locks its rows with SKIP LOCKED and updates them by ctid. A row that another
statement updated between the claim's snapshot and its lock is locked at a new version;
if the UPDATE then matched the old version, or the new one without re-checking it is
still queued, a shard could be claimed twice under one epoch or a cancelled shard run.
32 claimers race here with a priority flipper, a canceller and a rescuer, all released
together by one barrier.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db import batches as batch_queries
from pgbatch.db.shards import (
    ShardCompletion,
    claim_shards,
    complete_shards,
    heartbeat_shards,
    rescue_expired_shards,
)
from pgbatch.db.verify import verify_batch
from pgbatch.models import ShardStatus
from tests.helpers import register_noop

CLAIMERS = 32
OPEN = (
    "SELECT count(*) FROM pgbatch.shards WHERE status = 'queued'"
    " OR (status = 'running' AND lease_expires_at < now())"
)


@pytest.mark.asyncio
async def test_claims_race_priority_cancel_and_rescue_one_claim_per_epoch(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    kept = await app.submit("t", range(240), shard_size=1)
    doomed = await app.submit("t", range(240), shard_size=1)
    conns = [
        await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        for _ in range(CLAIMERS + 1)
    ]
    claimers, rescuer_conn = conns[:CLAIMERS], conns[CLAIMERS]
    barrier = asyncio.Barrier(CLAIMERS + 3)
    stop = asyncio.Event()

    async def claimer(conn: psycopg.AsyncConnection[Any], n: int) -> list[tuple[int, int]]:
        rng = random.Random(n)
        mine: list[tuple[int, int]] = []
        held: list[tuple[int, int]] = []
        await barrier.wait()
        while True:
            shards = await claim_shards(
                conn, worker_id=f"w{n}", queues=["default"], tasks=["t"],
                limit=rng.randint(1, 8),
            )  # fmt: skip
            for s in shards:
                mine.append((s.id, s.lease_epoch))
                if s.lease_epoch == 1 and s.id % 3 == 0:
                    # This lease lapses at once: the rescuer requeues it, under its feet.
                    await conn.execute(
                        "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 s'"
                        " WHERE id = %s AND lease_epoch = 1",
                        (s.id,),
                    )
                else:
                    held.append((s.id, s.lease_epoch))
            if held:
                await heartbeat_shards(conn, held[-16:])
            if not shards:
                row = await (await conn.execute(OPEN)).fetchone()
                assert row is not None
                if row[0] == 0:
                    return mine

    async def rescuer() -> int:
        await barrier.wait()
        rescued = 0
        while not stop.is_set():
            rescued += await rescue_expired_shards(rescuer_conn)
            await asyncio.sleep(0)
        return rescued

    async def flipper() -> int:
        await barrier.wait()
        flips = 0
        while not stop.is_set():
            for batch in (kept, doomed):
                await app.set_priority(batch.id, flips % 7)
                flips += 1
        return flips

    async def canceller() -> None:
        await barrier.wait()
        await asyncio.sleep(0.05)
        await app.cancel(doomed.id)

    try:
        background = [asyncio.create_task(rescuer()), asyncio.create_task(flipper())]
        cancelling = asyncio.create_task(canceller())
        per_claimer = await asyncio.gather(*(claimer(c, n) for n, c in enumerate(claimers)))
        await cancelling
        stop.set()
        rescued, flips = await asyncio.gather(*background)
    finally:
        for conn in conns:
            await conn.close()

    claims = Counter(claim for mine in per_claimer for claim in mine)
    assert max(claims.values()) == 1, [c for c, n in claims.items() if n > 1][:5]
    assert rescued > 0 and flips > 0
    assert sum(1 for mine in per_claimer if mine) > 1
    epochs: dict[int, list[int]] = {}
    for shard_id, epoch in sorted(claims):
        epochs.setdefault(shard_id, []).append(epoch)
    # Epochs of a shard are 1..k, each claimed once: no claim lost its bump or doubled it.
    assert all(e == list(range(1, len(e) + 1)) for e in epochs.values())
    async with app.db.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT s.id, s.batch_id, s.status, s.lease_epoch,"
                " EXISTS (SELECT 1 FROM pgbatch.result_errors e WHERE e.batch_id = s.batch_id"
                "         AND e.seq BETWEEN s.first_seq AND s.last_seq"
                "         AND e.error = 'cancelled') AS cancelled_result"
                " FROM pgbatch.shards s WHERE s.batch_id = ANY(%s)",
                ([kept.id, doomed.id],),
            )
        ).fetchall()
    for shard_id, batch_id, status, epoch, cancelled_result in rows:
        # The final epoch is the last claim's, and a shard is either cancelled (never claimed
        # after) or running under a claim: a claim over a cancelled row would show both.
        assert epoch == len(epochs.get(shard_id, [])), (shard_id, status, epoch)
        if status == "cancelled":
            assert batch_id == doomed.id and cancelled_result
        else:
            assert status == "running" and not cancelled_result, (shard_id, status)
    assert {r[2] for r in rows if r[1] == kept.id} == {"running"}
    assert len(rows) == 480


@pytest.mark.asyncio
async def test_a_first_claim_does_not_wait_for_a_cancel_holding_the_batch_row(
    app: pgbatch.App, database_url: str
) -> None:
    """Cancel locks the batch, then its queued shards; the claim locks shards, then the
    batch it starts. Had the claim waited for the batch row, the two would deadlock."""
    register_noop(app)
    batch = await app.submit("t", range(4), shard_size=1)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as canceller,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as claimer,
    ):
        # A wait for the batch row fails here rather than hang into the deadlock.
        await claimer.execute("SET lock_timeout = '10s'")
        await canceller.execute(
            "SELECT 1 FROM pgbatch.batches WHERE id = %s FOR NO KEY UPDATE", (batch.id,)
        )
        claimed = await claim_shards(
            claimer, worker_id="w", queues=["default"], tasks=["t"], limit=2
        )
        assert len(claimed) == 2
        # The cancel's own shard update skips the claimed shards (running now).
        assert await batch_queries.cancel_batch(canceller, batch.id)
        await canceller.commit()
        async with app.db.connection() as conn, conn.transaction():
            report = await complete_shards(
                conn,
                [
                    ShardCompletion.build(
                        s.id,
                        s.batch_id,
                        s.lease_epoch,
                        ShardStatus.DONE,
                        [(i.seq, pgbatch.ok(1)) for i in s.items],
                    )
                    for s in claimed
                ],
            )
        assert report.finished_batches == [batch.id]
    done = await app.get_batch(batch.id)
    assert (done.status, done.shards_done, done.items_ok, done.items_cancelled) == (
        "cancelled", 4, 2, 2,
    )  # fmt: skip
    assert done.started_at is not None
    async with app.db.connection() as conn:
        check = await verify_batch(conn, batch.id)
    assert check.every_item_has_one_result and check.shards_open == 0
