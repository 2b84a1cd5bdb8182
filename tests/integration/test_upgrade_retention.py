"""A database at migration 0004, with finished and running batches, upgrades through 0008.

0008 adds retention: batches made before it keep every row and have no retention (an
upgrade never schedules the deletion of data nobody asked to expire); the running batch
finishes after the upgrade; a new batch gets the default retention; and the old batches
go only when asked with `finished_before`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import migrate
from pgbatch.errors import BatchPrunedError
from tests.conftest import settings_for
from tests.helpers import register_noop
from tests.integration.test_upgrade import CORE_ROWS


async def _fill_at_0004(conn: psycopg.AsyncConnection[Any]) -> None:
    assert await migrate(conn, up_to=4) == [1, 2, 3, 4]
    await conn.execute(
        """
        INSERT INTO pgbatch.batches (tenant, task, status, shard_size, max_attempts,
            lease_ttl_s, total_items, total_shards, shards_done, items_ok, items_failed,
            on_complete, started_at, finished_at)
        VALUES ('acme', 't', 'succeeded', 2, 3, 30, 3, 2, 2, 2, 1, 'cb', now(), now()),
               ('default', 't', 'running', 2, 3, 30, 4, 2, 1, 2, 0, NULL, now(), NULL);
        INSERT INTO pgbatch.items (batch_id, seq, payload)
        VALUES (1, 0, '{"p": "a"}'), (1, 1, '{"p": "b"}'), (1, 2, '[3]'),
               (2, 0, '"w"'), (2, 1, '"x"'), (2, 2, '"y"'), (2, 3, '"z"');
        INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task,
            queue, priority, status, attempts, max_attempts, lease_ttl_s, finished_at,
            lease_refunds)
        VALUES (1, 'acme', 0, 0, 1, 't', 'default', 0, 'done', 1, 3, 30, now(), 0),
               (1, 'acme', 1, 2, 2, 't', 'default', 0, 'done', 2, 3, 30, now(), 1),
               (2, 'default', 0, 0, 1, 't', 'default', 0, 'done', 1, 3, 30, now(), 0),
               (2, 'default', 1, 2, 3, 't', 'default', 0, 'queued', 0, 3, 30, NULL, 0);
        INSERT INTO pgbatch.results (batch_id, seq, ok, output, error)
        VALUES (1, 0, true, '"A"', NULL), (1, 1, true, '{"n": 1}', NULL),
               (1, 2, false, NULL, 'boom'), (2, 0, true, '"W"', NULL), (2, 1, true, '"X"', NULL);
        INSERT INTO pgbatch.callbacks (batch_id, run_no, name, batch_status, status)
        VALUES (1, 1, 'cb', 'succeeded', 'done');
        """
    )


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str) -> list[tuple[Any, ...]]:
    return list(await (await conn.execute(sql)).fetchall())


@pytest.mark.asyncio
async def test_a_0004_database_upgrades_through_0008_with_its_data(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await _fill_at_0004(conn)
        before = {name: await _rows(conn, sql) for name, sql in CORE_ROWS.items()}

    async with pgbatch.App(settings=settings_for(empty_database)) as app:  # migrates on open
        register_noop(app)
        async with app.db.connection() as conn:
            applied = await _rows(conn, "SELECT version FROM pgbatch.schema_migrations")
            assert (8,) in applied
            after = {name: await _rows(conn, sql) for name, sql in CORE_ROWS.items()}
            assert after == before  # every row kept
            retention = await _rows(conn, "SELECT id, retention_s FROM pgbatch.batches")
            assert sorted(retention) == [(1, None), (2, None)]

        # Nothing old is due: the upgrade scheduled no deletion.
        assert (await app.prune()).pruned == []
        # The running batch finishes on this release, its first shard's results kept.
        worker = app.worker(concurrency=2)
        task = asyncio.create_task(worker.run())
        try:
            running = await app.wait(2, timeout_s=30)
            fresh = await app.submit("t", range(3), retention_s=0)
            await app.wait(fresh.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)
        assert (running.status, running.items_ok, running.items_failed) == ("succeeded", 4, 0)
        outputs = [o.output for _, o in [r async for r in app.results(2)]]
        assert outputs[:2] == ["W", "X"]  # written before the upgrade
        default = await app.submit("t", [1])
        async with app.db.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT retention_s FROM pgbatch.batches WHERE id = %s", (default.id,)
                )
            ).fetchone()
        assert row == (7 * 24 * 3600.0,)  # new batches get the default

        # The new short-lived batch goes; the old ones only when asked.
        assert (await app.prune()).pruned == [fresh.id]
        asked = await app.prune(finished_before=datetime.now(UTC) + timedelta(seconds=1))
        assert sorted(asked.pruned) == [1, 2]
        for batch_id in (1, 2, fresh.id):
            with pytest.raises(BatchPrunedError):
                await app.get_batch(batch_id)
        async with app.db.connection() as conn:
            for table in ("items", "shards", "results", "callbacks"):
                left = await _rows(
                    conn,
                    f"SELECT count(*) FROM pgbatch.{table} WHERE batch_id <> {default.id}",
                )
                assert left == [(0,)], table
