"""0012 (one index of queued shards) upgrades a live database without stalling its claims.

The index is dropped under a short lock_timeout, retried: while a worker's transaction
holds a shard row, the upgrade waits, but another worker's claim is not queued behind its
ACCESS EXCLUSIVE request (a plain DROP INDEX would hold every claim until that
transaction ended).
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from pgbatch.db.migrations import migrate
from pgbatch.db.shards import claim_shards
from tests.helpers import wait_until
from tests.integration.test_upgrade_retention import _fill_at_0004


async def _upgrade_is_waiting(conn: psycopg.AsyncConnection[Any], pid: int) -> bool:
    """Tell whether the upgrader is between tries (asleep) or trying (waiting on a lock)."""
    cur = await conn.execute(
        "SELECT wait_event_type IN ('Lock', 'Timeout') FROM pg_stat_activity WHERE pid = %s",
        (pid,),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


async def _indexes(conn: psycopg.AsyncConnection[Any]) -> set[str]:
    cur = await conn.execute(
        "SELECT indexname FROM pg_indexes WHERE schemaname = 'pgbatch' AND tablename = 'shards'"
    )
    return {row[0] for row in await cur.fetchall()}


@pytest.mark.asyncio
async def test_0012_waits_for_a_held_shard_without_stalling_claims(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await _fill_at_0004(conn)
        await migrate(conn, up_to=11)
    async with (
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as holder,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as upgrader,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as claimer,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as observer,
    ):
        assert "shards_queued_wait_idx" in await _indexes(observer)
        cur = await observer.execute(
            "SELECT id, task FROM pgbatch.shards WHERE status = 'queued' ORDER BY id"
        )
        queued = await cur.fetchall()
        assert queued, "the 0004 fixture has a queued shard"
        # A worker's transaction holds a shard row: the upgrade cannot drop the index.
        await holder.execute("BEGIN")
        await holder.execute("UPDATE pgbatch.shards SET attempts = attempts WHERE id = 1")
        upgrade = asyncio.create_task(migrate(upgrader))
        try:
            pid = upgrader.info.backend_pid
            await wait_until(lambda: _upgrade_is_waiting(observer, pid), 30)
            # Another worker claims meanwhile: not stuck behind the upgrade's lock request.
            tasks = sorted({task for _, task in queued})
            claim = claim_shards(claimer, worker_id="w", queues=["default"], tasks=tasks, limit=10)
            claimed = await asyncio.wait_for(claim, 10)
            assert {s.id for s in claimed} == {shard_id for shard_id, _ in queued}
            assert not upgrade.done()
        finally:
            await holder.execute("COMMIT")
        assert await asyncio.wait_for(upgrade, 30) == [12]
        assert "shards_queued_wait_idx" not in await _indexes(observer)
        assert "shards_tenant_claim_idx" in await _indexes(observer)
