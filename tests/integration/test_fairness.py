"""Issue 9: one tenant's flood, whatever its priority, does not hold back another tenant.

True concurrency: many connections claim at once (released together on a barrier), as
workers do; the assertions are on counts and order, never on time.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import ClaimCursor, claim_shards
from tests.helpers import register_noop

# Many times what all claimers take in one round at the largest limit below (8 x 32), so
# that a batch queued behind the flood would wait for many rounds.
FLOOD_SHARDS = 3000
SMALL_SHARDS = 5
CLAIMERS = 8
TOP_PRIORITY = 2**31 - 1


async def _rounds_until_small_done(
    url: str, small_batch: int, *, limit: int, fair: bool
) -> tuple[int, int]:
    """Claim with CLAIMERS connections at once until the small batch is all claimed.

    Return the round (each claimer's 1st claim, 2nd claim, ...) in which the last of the
    small batch's shards was claimed, and how many other shards were claimed in all.
    Every claimed shard is checked to be claimed once.
    """
    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True) for _ in range(CLAIMERS)]
    barrier = asyncio.Barrier(CLAIMERS)
    claimed: set[int] = set()
    small_rounds: list[int] = []

    async def claimer(conn: psycopg.AsyncConnection[Any], n: int) -> None:
        cursor = ClaimCursor()
        await barrier.wait()
        round_no = 0
        while len(small_rounds) < SMALL_SHARDS:
            round_no += 1
            shards = await claim_shards(
                conn,
                worker_id=f"w{n}",
                queues=["default"],
                tasks=["t"],
                limit=limit,
                cursor=cursor,
                fair=fair,
            )
            if not shards:
                return
            for shard in shards:
                assert shard.id not in claimed, "a shard was claimed twice (invariant 1)"
                claimed.add(shard.id)
                if shard.batch_id == small_batch:
                    small_rounds.append(round_no)

    try:
        await asyncio.gather(*(claimer(c, n) for n, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    assert len(small_rounds) == SMALL_SHARDS
    return max(small_rounds), len(claimed) - SMALL_SHARDS


@pytest.mark.asyncio
@pytest.mark.parametrize("limit", [1, 4, 32])
async def test_a_small_batch_is_not_starved_behind_another_tenants_top_priority_flood(
    app: pgbatch.App, database_url: str, limit: int
) -> None:
    register_noop(app)
    await app.submit("t", range(FLOOD_SHARDS), shard_size=1, tenant="a", priority=TOP_PRIORITY)
    small = await app.submit("t", range(SMALL_SHARDS), shard_size=1, tenant="b")

    last_round, flood_claimed = await _rounds_until_small_done(
        database_url, small.id, limit=limit, fair=True
    )

    # Every claim takes turns between the two tenants, so B's shards go in the first
    # rounds (with limit 1, a claimer alternates: A, B, A, ...; a B shard another claimer
    # holds is skipped, so allow a round per shard). Behind the flood they would wait
    # FLOOD_SHARDS / (CLAIMERS * limit) rounds: 12 at limit 32, 94 at 4, 375 at 1.
    # Rounds are counted per claimer, and claimers run at their own pace: a fast one may
    # reach its third round while a B shard it was offered is still locked by a slower
    # one's first (SKIP LOCKED passes it by), so allow twice the ideal 2 rounds (seen: 3,
    # in 1 of 5 runs on a loaded machine, at the release before this test was loosened).
    assert last_round <= (2 + SMALL_SHARDS if limit == 1 else 4), last_round
    assert flood_claimed < FLOOD_SHARDS // 2, flood_claimed


@pytest.mark.asyncio
async def test_the_priority_only_claim_starves_the_small_batch(
    app: pgbatch.App, database_url: str
) -> None:
    # The control: the claim before fairness (kept as the top-up and the benchmark's
    # baseline) takes every one of A's shards before any of B's.
    register_noop(app)
    await app.submit("t", range(FLOOD_SHARDS), shard_size=1, tenant="a", priority=TOP_PRIORITY)
    small = await app.submit("t", range(SMALL_SHARDS), shard_size=1, tenant="b")
    _, flood_claimed = await _rounds_until_small_done(database_url, small.id, limit=32, fair=False)
    # A B shard is only reached once every A shard is claimed or locked by a claim in flight.
    assert flood_claimed == FLOOD_SHARDS


@pytest.mark.asyncio
async def test_within_a_tenant_priority_still_orders_the_claim(app: pgbatch.App) -> None:
    register_noop(app)
    await app.submit("t", range(20), shard_size=1, tenant="a", priority=TOP_PRIORITY)
    low = await app.submit("t", range(3), shard_size=1, tenant="b", priority=0)
    high = await app.submit("t", range(3), shard_size=1, tenant="b", priority=5)
    cursor = ClaimCursor()
    order: list[int] = []
    async with app.db.connection() as conn:
        while shards := await claim_shards(
            conn, worker_id="w", queues=["default"], tasks=["t"], limit=2, cursor=cursor
        ):
            # Each claim of 2 shares the turn: one of A's, one of B's.
            assert len({s.tenant for s in shards}) == (2 if len(order) < 6 else 1), shards
            order.extend(s.batch_id for s in shards if s.tenant == "b")
    assert order == [high.id] * 3 + [low.id] * 3
