"""A database from before 0010, with data and a worker's open write, upgrades through 0010.

0010 lowers the autovacuum threshold of item_blocks. A storage parameter takes
a SHARE UPDATE EXCLUSIVE lock, so the upgrade goes through while a worker's transaction
holds rows of all three tables (it waits for no reader or writer); every row is kept
and the running batch finishes on the new schema.
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
from tests.integration.test_upgrade import CORE_ROWS
from tests.integration.test_upgrade_retention import _fill_at_0004

EXPECTED = {
    "item_blocks": ["autovacuum_vacuum_scale_factor=0.01"],
    "result_blocks": None,  # measured no better with it (docs/design/retention.md)
    "shards": None,
}
RELOPTIONS_SQL = """
SELECT relname, (SELECT array_agg(o ORDER BY o) FROM unnest(reloptions) o)
FROM pg_class WHERE relnamespace = 'pgbatch'::regnamespace AND relname = ANY(%s)
ORDER BY 1
"""


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str) -> list[tuple[Any, ...]]:
    return list(await (await conn.execute(sql)).fetchall())


async def _waits_on_a_lock(conn: psycopg.AsyncConnection[Any], pid: int) -> bool:
    cur = await conn.execute(
        "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)
    )
    row = await cur.fetchone()
    return bool(row and row[0])


@pytest.mark.asyncio
async def test_a_database_before_0010_upgrades_while_a_worker_writes(
    empty_database: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await _fill_at_0004(conn)
        # Every migration before 0010 (0009: the blocks).
        assert await migrate(conn, up_to=9) == [5, 6, 7, 8, 9]
        before = {name: await _rows(conn, sql) for name, sql in CORE_ROWS.items()}
        cur = await conn.execute(RELOPTIONS_SQL, (list(EXPECTED),))
        assert await cur.fetchall() == [
            ("item_blocks", None),
            ("result_blocks", None),
            ("shards", None),
        ]

    async with (
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as writer,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as upgrader,
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as observer,
    ):
        # A worker's transaction in flight: it holds a row of each table (no-op writes).
        await writer.execute("BEGIN")
        await writer.execute("UPDATE pgbatch.shards SET attempts = attempts WHERE id = 4")
        await writer.execute(
            "UPDATE pgbatch.item_blocks SET payloads = payloads WHERE batch_id = 2"
        )
        await writer.execute(
            "UPDATE pgbatch.result_blocks SET outputs = outputs WHERE batch_id = 2"
        )
        pid = upgrader.info.backend_pid
        # Up to 0010: 0011 adds a column and 0012 drops an index, each waiting for the
        # lock by design (test_upgrade_block_time, test_upgrade_claim_index).
        upgrade = asyncio.create_task(migrate(upgrader, up_to=10))

        async def ended_or_blocked() -> bool:
            return upgrade.done() or await _waits_on_a_lock(observer, pid)

        await wait_until(ended_or_blocked, 30)
        blocked = not upgrade.done()
        await writer.execute("COMMIT")
        applied = await upgrade
        assert not blocked, "the upgrade waited for a worker's open transaction"
        assert applied == [10]

    async with pgbatch.App(settings=settings_for(empty_database)) as app:  # migrates the rest
        register_noop(app)
        async with app.db.connection() as conn:
            after = {name: await _rows(conn, sql) for name, sql in CORE_ROWS.items()}
            assert after == before  # every row kept
            cur = await conn.execute(RELOPTIONS_SQL, (list(EXPECTED),))
            assert dict(await cur.fetchall()) == EXPECTED
        # The batch that was running finishes on the new schema.
        worker = app.worker(concurrency=2)
        task = asyncio.create_task(worker.run())
        try:
            running = await app.wait(2, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)
        assert (running.status, running.items_ok, running.items_failed) == ("succeeded", 4, 0)
