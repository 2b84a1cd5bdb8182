"""0011 (result blocks carry their finish time) upgrades a live database without stalling it.

The column is added under a short lock_timeout, retried: while a worker's transaction
holds result_blocks, the upgrade waits, but another worker's completion writing a block
is not queued behind it. The done shard rows the previous release kept stay, and the
readers (shard states, throughput) count them once, next to the shards deleted since.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import migrate
from tests.conftest import settings_for
from tests.helpers import register_noop, wait_until
from tests.integration.test_upgrade_retention import _fill_at_0004


async def _upgrade_is_waiting(conn: psycopg.AsyncConnection[Any], pid: int) -> bool:
    """Tell whether the upgrader is between tries (asleep) or trying (waiting on a lock)."""
    cur = await conn.execute(
        "SELECT wait_event_type IN ('Lock', 'Timeout') FROM pg_stat_activity WHERE pid = %s",
        (pid,),
    )
    row = await cur.fetchone()
    return bool(row and row[0])


@pytest.mark.asyncio
async def test_0011_waits_for_a_held_table_without_stalling_other_completions(
    empty_database: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await _fill_at_0004(conn)
        assert await migrate(conn, up_to=10) == [5, 6, 7, 8, 9, 10]
    async with (
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as holder,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as upgrader,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as completer,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as observer,
    ):
        # A worker's flush in flight on result_blocks: the upgrade cannot add its column.
        await holder.execute("BEGIN")
        await holder.execute(
            "UPDATE pgbatch.result_blocks SET outputs = outputs WHERE batch_id = 2"
        )
        upgrade = asyncio.create_task(migrate(upgrader, up_to=11))
        try:
            pid = upgrader.info.backend_pid
            await wait_until(lambda: _upgrade_is_waiting(observer, pid), 30)
            # Another worker's completion writes a block meanwhile: it is not stuck behind
            # the upgrade's lock request (which a plain ALTER TABLE would queue it behind).
            await asyncio.wait_for(
                completer.execute(
                    "INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)"
                    ' VALUES (2, 2, \'["Y", "Z"]\')'
                ),
                10,
            )
            assert not upgrade.done()
        finally:
            await holder.execute("COMMIT")
        assert await asyncio.wait_for(upgrade, 30) == [11]
        cur = await observer.execute(
            "SELECT batch_id, first_seq, finished_at IS NULL FROM pgbatch.result_blocks"
            " ORDER BY 1, 2"
        )
        # Blocks written before 0011 have no time (their shard rows have it).
        assert await cur.fetchall() == [(1, 0, True), (1, 2, True), (2, 0, True), (2, 2, True)]
        await observer.execute(
            "DELETE FROM pgbatch.result_blocks WHERE batch_id = 2 AND first_seq = 2"
        )


@pytest.mark.asyncio
async def test_readers_count_the_old_done_rows_once_after_0011(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await _fill_at_0004(conn)
    async with pgbatch.App(settings=settings_for(empty_database)) as app:  # migrates to head
        register_noop(app)
        _, finished = await app.insight(1)
        assert finished.shard_states == {"done": 2}
        assert sum(items for _, items in finished.throughput) == 3
        _, running = await app.insight(2)
        assert running.shard_states == {"done": 1, "queued": 1}
        assert sum(items for _, items in running.throughput) == 2
        worker = app.worker(concurrency=2)
        task = asyncio.create_task(worker.run())
        try:
            batch = await app.wait(2, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)
        assert (batch.status, batch.shards_done, batch.items_ok) == ("succeeded", 2, 4)
        async with app.db.connection() as conn:
            cur = await conn.execute(
                "SELECT shard_no, status FROM pgbatch.shards WHERE batch_id = 2 ORDER BY 1"
            )
            # The old release's done row stays; the shard done since is deleted.
            assert await cur.fetchall() == [(0, "done")]
        _, ended = await app.insight(2)
        assert ended.shard_states == {"done": 2}
        assert sum(items for _, items in ended.throughput) == 4
        # Batch 1's failed item is retried from its old done row, and only that item runs.
        assert await app.retry(1) == 1
