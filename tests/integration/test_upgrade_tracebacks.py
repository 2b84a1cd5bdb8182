"""A database at migration 0004 with failed results upgrades through 0006 with its data.

0006 adds the tracebacks: nullable columns on shards and results and a table. The old
failures keep their rows and read back with no traceback; new failures get one.
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import migrate
from tests.conftest import settings_for

RESULTS = "SELECT batch_id, seq, ok, output::text, error FROM pgbatch.results ORDER BY 1, 2"
SHARDS = "SELECT id, status, attempts, last_error FROM pgbatch.shards ORDER BY id"


@pytest.mark.asyncio
async def test_a_0004_database_with_failures_upgrades_and_keeps_them(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await migrate(conn, up_to=4) == [1, 2, 3, 4]
        await conn.execute(
            """
            INSERT INTO pgbatch.batches (tenant, task, status, shard_size, max_attempts,
                lease_ttl_s, total_items, total_shards, shards_done, shards_dead, items_ok,
                items_failed, started_at, finished_at)
            VALUES ('acme', 'work', 'failed', 2, 2, 30, 4, 2, 2, 1, 1, 3, now(), now());
            INSERT INTO pgbatch.items (batch_id, seq, payload)
            VALUES (1, 0, '{"p": 0}'), (1, 1, '{"p": 1}'), (1, 2, '{"p": 2}'), (1, 3, '{"p": 3}');
            INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task,
                queue, priority, status, attempts, max_attempts, lease_ttl_s, last_error,
                finished_at, lease_refunds)
            VALUES (1, 'acme', 0, 0, 1, 'work', 'default', 0, 'done', 1, 2, 30, NULL, now(), 0),
                   (1, 'acme', 1, 2, 3, 'work', 'default', 0, 'dead', 2, 2, 30,
                    'failed after 2 attempts: KeyError: ''prompt''', now(), 1);
            INSERT INTO pgbatch.results (batch_id, seq, ok, output, error)
            VALUES (1, 0, true, '"A"', NULL), (1, 1, false, NULL, 'asked to fail'),
                   (1, 2, false, NULL, 'failed after 2 attempts: KeyError: ''prompt'''),
                   (1, 3, false, NULL, 'failed after 2 attempts: KeyError: ''prompt''');
            """
        )
        before = {sql: await (await conn.execute(sql)).fetchall() for sql in (RESULTS, SHARDS)}

    app = pgbatch.App(settings=settings_for(empty_database))

    @app.task("work", max_attempts=1, shard_size=2)
    async def work(items: list[pgbatch.Item], _: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        if any(item.value == "bad" for item in items):
            raise ValueError("bad item")
        return [pgbatch.ok(item.value) for item in items]

    async with app:
        async with app.db.connection() as conn:
            for sql, rows in before.items():
                assert await (await conn.execute(sql)).fetchall() == rows
            applied = await (
                await conn.execute("SELECT version FROM pgbatch.schema_migrations ORDER BY 1")
            ).fetchall()
        assert (6,) in applied
        # The old failures read back through every new path, without a traceback.
        failed = [(seq, o.error, o.traceback) async for seq, o in app.results(1, errors_only=True)]
        assert failed == [
            (1, "asked to fail", None),
            (2, "failed after 2 attempts: KeyError: 'prompt'", None),
            (3, "failed after 2 attempts: KeyError: 'prompt'", None),
        ]
        _, groups, total = await app.error_groups(1, samples=5)
        assert total == 2
        assert [(g.error, g.items, [s for s, _ in g.samples]) for g in groups] == [
            ("failed after 2 attempts: KeyError: 'prompt'", 2, [2, 3]),
            ("asked to fail", 1, [1]),
        ]
        assert groups[0].sample_tracebacks == (None, None)
        _, insight = await app.insight(1)
        assert insight.last_error is not None and insight.last_error.traceback is None
        assert insight.dead_shards == [(1, 2, 3, "failed after 2 attempts: KeyError: 'prompt'")]

        # A new failure in the upgraded database keeps its traceback.
        batch = await app.submit("work", ["ok", "bad"])
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            await app.wait(batch.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        [(seq, outcome)] = [r async for r in app.results(batch.id, errors_only=True)]
        assert seq == 1 and outcome.traceback and "ValueError: bad item" in outcome.traceback
