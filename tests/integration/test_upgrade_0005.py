"""A database at migration 0004 with work in every state upgrades in place through 0005
(the worker registry, queue pauses, the queued shards' wait index) and keeps it all."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import migrate
from pgbatch.fleet import WaitingReason
from tests.conftest import settings_for

SHARDS = (
    "SELECT id, batch_id, tenant, shard_no, status, attempts, lease_epoch, lease_refunds,"
    " worker_id, run_after FROM pgbatch.shards ORDER BY id"
)


async def _fill_at_0004(conn: psycopg.AsyncConnection[Any]) -> None:
    assert await migrate(conn, up_to=4) == [1, 2, 3, 4]
    await conn.execute(
        """
        INSERT INTO pgbatch.batches (tenant, task, queue, status, shard_size, max_attempts,
            lease_ttl_s, total_items, total_shards, shards_done, items_ok)
        VALUES ('acme', 't', 'q1', 'running', 1, 3, 30, 3, 3, 1, 1),
               ('globex', 't', 'q1', 'pending', 1, 3, 30, 1, 1, 0, 0);
        INSERT INTO pgbatch.items (batch_id, seq, payload)
        VALUES (1, 0, '"a"'), (1, 1, '"b"'), (1, 2, '"c"'), (2, 0, '"z"');
        INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task,
            queue, priority, status, attempts, max_attempts, lease_ttl_s, lease_epoch,
            lease_expires_at, worker_id, lease_refunds, run_after, finished_at)
        VALUES (1, 'acme', 0, 0, 0, 't', 'q1', 0, 'done', 1, 3, 30, 1, NULL, 'old', 0,
                now() - interval '2 hours', now()),
               (1, 'acme', 1, 1, 1, 't', 'q1', 0, 'running', 1, 3, 30, 1,
                now() + interval '1 hour', 'old', 0, now() - interval '2 hours', NULL),
               (1, 'acme', 2, 2, 2, 't', 'q1', 0, 'queued', 2, 3, 30, 2, NULL, NULL, 1,
                now() - interval '1 hour', NULL),
               (2, 'globex', 0, 0, 0, 't', 'q1', 0, 'queued', 0, 3, 30, 0, NULL, NULL, 0,
                now(), NULL);
        INSERT INTO pgbatch.results (batch_id, seq, ok, output) VALUES (1, 0, true, '"A"');
        """
    )


@pytest.mark.asyncio
async def test_a_database_at_0004_with_work_upgrades_through_0005(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await _fill_at_0004(conn)
        before = await (await conn.execute(SHARDS)).fetchall()
    app = pgbatch.App(settings=settings_for(empty_database, worker_beat_s=0.1))

    @app.task("t", queue="q1")
    async def t(items: list[pgbatch.Item], _: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(item.value) for item in items]

    await app.open()
    try:
        async with app.db.connection() as conn:
            assert await (await conn.execute(SHARDS)).fetchall() == before
            applied = await (
                await conn.execute("SELECT version FROM pgbatch.schema_migrations ORDER BY 1")
            ).fetchall()
            assert (5,) in applied
        # The old queued shards are counted from the new index, with their old wait.
        [q1] = await app.queues(tenant="acme")
        assert (q1.name, q1.queued_shards, q1.running_shards, q1.paused) == ("q1", 1, 1, False)
        assert q1.oldest_queued_s >= 3600
        # No worker has registered yet: the old batches say so.
        batches = [await app.get_batch(1), await app.get_batch(2)]
        assert await app.waiting_reasons(batches) == {
            1: WaitingReason.NO_LIVE_WORKER,
            2: WaitingReason.NO_LIVE_WORKER,
        }
        # A paused queue holds the old work back; resumed, a worker of this release runs it.
        await app.pause_queue("q1")
        assert await app.waiting_reasons(batches) == {
            1: WaitingReason.QUEUE_PAUSED,
            2: WaitingReason.QUEUE_PAUSED,
        }
        await app.resume_queue("q1")
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            done = await app.wait(2, timeout_s=30)
            assert (done.status, done.items_ok) == ("succeeded", 1)
            assert [w.id for w in await app.workers()] == [worker.worker_id]
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
    finally:
        await app.close()
