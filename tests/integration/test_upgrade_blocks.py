"""A database made by migrations 0001-0008, with work of every kind, upgrades through 0009.

0009 stores items and results one row per shard (docs/design/storage-layout.md). The old
rows are written as the release before it wrote them: a finished batch with failures and
tracebacks, a running batch (a shard done, one running on an expired lease, one queued),
a retried batch whose rerun has not run (its failed results deleted), a cancelled batch,
a dead shard, and the leftovers of a pruned batch. After the upgrade every item and
result reads back as before, through the views and through every API path; the counters
are untouched; then the running batches finish on the new layout and a retry reruns only
the failed items.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.copy import traceback_digest
from pgbatch.db.migrations import migrate
from pgbatch.db.verify import verify_batch
from tests.conftest import settings_for

TRACE = "Traceback (most recent call last):\n  File \"h.py\", line 3\nKeyError: 'p'\n"
DIGEST = traceback_digest(TRACE)

ITEMS = "SELECT batch_id, seq, payload::text FROM pgbatch.items ORDER BY 1, 2"
RESULTS = (
    "SELECT batch_id, seq, ok, output::text, error, traceback_digest FROM pgbatch.results"
    " ORDER BY 1, 2"
)
BATCHES = (
    "SELECT id, status, total_items, total_shards, shards_done, shards_dead, items_ok,"
    " items_failed, items_cancelled, run_no, version FROM pgbatch.batches ORDER BY id"
)
SHARDS = (
    "SELECT id, batch_id, shard_no, status, attempts, lease_epoch, retried, last_error"
    " FROM pgbatch.shards ORDER BY id"
)

FILL_0008 = """
INSERT INTO pgbatch.batches (tenant, task, status, shard_size, max_attempts, lease_ttl_s,
    total_items, total_shards, shards_done, shards_dead, items_ok, items_failed,
    items_cancelled, run_no, started_at, finished_at)
VALUES
    -- 1: finished, two failed items (one with a traceback)
    ('acme', 'work', 'succeeded', 3, 2, 30, 7, 3, 3, 0, 5, 2, 0, 1, now(), now()),
    -- 2: running: shard 0 done, shard 1 running on an expired lease, shard 2 queued
    ('acme', 'work', 'running', 2, 3, 30, 6, 3, 1, 0, 2, 0, 0, 1, now(), NULL),
    -- 3: reopened by a retry: shard 1's failed items 6 and 7 lost their results
    ('default', 'work', 'running', 4, 2, 30, 8, 2, 1, 0, 6, 0, 0, 2, now(), NULL),
    -- 4: cancelled: shard 1 never ran
    ('default', 'work', 'cancelled', 2, 3, 30, 4, 2, 2, 0, 2, 0, 2, 1, now(), now()),
    -- 5: a dead shard, its items failed with the shard's traceback
    ('acme', 'work', 'failed', 2, 1, 30, 2, 1, 1, 1, 0, 2, 0, 1, now(), now()),
    -- 6: its dead shard retried: every result deleted, none written yet
    ('acme', 'work', 'running', 2, 1, 30, 2, 1, 0, 0, 0, 0, 0, 2, now(), NULL);

INSERT INTO pgbatch.items (batch_id, seq, payload)
SELECT 1, g, json_build_object('n', g) FROM generate_series(0, 6) g
UNION ALL SELECT 2, g, to_json('two-' || g) FROM generate_series(0, 5) g
UNION ALL SELECT 3, g, json_build_array(g, 'x') FROM generate_series(0, 7) g
UNION ALL SELECT 4, g, to_json(g) FROM generate_series(0, 3) g
UNION ALL SELECT 5, g, '{"p":  "spaced"}'::json FROM generate_series(0, 1) g
UNION ALL SELECT 6, g, to_json('six-' || g) FROM generate_series(0, 1) g
-- the leftovers of a pruned batch (its tombstone below, its row gone)
UNION ALL SELECT 99, g, to_json(g) FROM generate_series(0, 2) g;

INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task, queue,
    priority, status, attempts, max_attempts, lease_ttl_s, lease_epoch, lease_expires_at,
    worker_id, retried, last_error, last_traceback, finished_at)
VALUES
    (1, 'acme', 0, 0, 2, 'work', 'default', 0, 'done', 1, 2, 30, 1, NULL, 'w', false,
     '1 of 3 items failed alone', %(trace)s, now()),
    (1, 'acme', 1, 3, 5, 'work', 'default', 0, 'done', 1, 2, 30, 1, NULL, 'w', false,
     NULL, NULL, now()),
    (1, 'acme', 2, 6, 6, 'work', 'default', 0, 'done', 1, 2, 30, 1, NULL, 'w', false,
     NULL, NULL, now()),
    (2, 'acme', 0, 0, 1, 'work', 'default', 0, 'done', 1, 3, 30, 1, NULL, 'w', false,
     NULL, NULL, now()),
    (2, 'acme', 1, 2, 3, 'work', 'default', 0, 'running', 1, 3, 30, 1,
     now() - interval '1 minute', 'gone', false, NULL, NULL, NULL),
    (2, 'acme', 2, 4, 5, 'work', 'default', 0, 'queued', 0, 3, 30, 0, NULL, NULL, false,
     NULL, NULL, NULL),
    (3, 'default', 0, 0, 3, 'work', 'default', 0, 'done', 1, 2, 30, 1, NULL, 'w', false,
     NULL, NULL, now()),
    (3, 'default', 1, 4, 7, 'work', 'default', 0, 'queued', 0, 2, 30, 2, NULL, NULL, true,
     NULL, NULL, NULL),
    (4, 'default', 0, 0, 1, 'work', 'default', 0, 'done', 1, 3, 30, 1, NULL, 'w', false,
     NULL, NULL, now()),
    (4, 'default', 1, 2, 3, 'work', 'default', 0, 'cancelled', 0, 3, 30, 0, NULL, NULL, false,
     NULL, NULL, now()),
    (5, 'acme', 0, 0, 1, 'work', 'default', 0, 'dead', 1, 1, 30, 1, NULL, 'w', false,
     'failed after 1 attempts: KeyError: ''p''', %(trace)s, now()),
    (6, 'acme', 0, 0, 1, 'work', 'default', 0, 'queued', 0, 1, 30, 1, NULL, NULL, true,
     NULL, NULL, NULL);

INSERT INTO pgbatch.tracebacks (batch_id, digest, traceback)
VALUES (1, %(digest)s, %(trace)s), (5, %(digest)s, %(trace)s);

INSERT INTO pgbatch.results (batch_id, seq, ok, output, error, traceback_digest)
VALUES
    (1, 0, true, '{"out": 0}', NULL, NULL),
    (1, 1, false, NULL, 'failed after 2 attempts: KeyError: ''p''', %(digest)s),
    (1, 2, true, NULL, NULL, NULL),
    (1, 3, true, '"back\\\\slash \u00e9"', NULL, NULL),
    (1, 4, false, NULL, 'asked to fail', NULL),
    (1, 5, true, '[1,  2]', NULL, NULL),
    (1, 6, true, '{"deep": {"a": [1]}}', NULL, NULL),
    (2, 0, true, '"A"', NULL, NULL),
    (2, 1, true, '"B"', NULL, NULL),
    (3, 0, true, '0', NULL, NULL), (3, 1, true, '1', NULL, NULL),
    (3, 2, true, '2', NULL, NULL), (3, 3, true, '3', NULL, NULL),
    (3, 4, true, '"old 4"', NULL, NULL), (3, 5, true, '"old 5"', NULL, NULL),
    (4, 0, true, '"a"', NULL, NULL), (4, 1, true, '"b"', NULL, NULL),
    (4, 2, false, NULL, 'cancelled', NULL), (4, 3, false, NULL, 'cancelled', NULL),
    (5, 0, false, NULL, 'failed after 1 attempts: KeyError: ''p''', %(digest)s),
    (5, 1, false, NULL, 'failed after 1 attempts: KeyError: ''p''', %(digest)s),
    (99, 0, true, '0', NULL, NULL);

INSERT INTO pgbatch.pruned_batches (id, tenant, task, status, total_items, finished_at)
VALUES (99, 'acme', 'work', 'succeeded', 3, now());
"""


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str) -> list[tuple[Any, ...]]:
    return list(await (await conn.execute(sql)).fetchall())


@pytest.mark.asyncio
async def test_a_0008_database_upgrades_to_blocks_with_every_row(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await migrate(conn, up_to=8) == list(range(1, 9))
        for statement in FILL_0008.split(";\n\n"):
            await conn.execute(statement, {"trace": TRACE, "digest": DIGEST})
        # What every per-item read of the old layout answered, pruned leftovers excepted.
        items = [r for r in await _rows(conn, ITEMS) if r[0] != 99]
        results = [r for r in await _rows(conn, RESULTS) if r[0] != 99]
        batches = await _rows(conn, BATCHES)
        shards = await _rows(conn, SHARDS)
        applied = await migrate(conn)
        assert applied[0] == 9 and applied == sorted(applied)
        # The views answer exactly what the tables did; nothing else moved.
        assert await _rows(conn, ITEMS) == items
        assert await _rows(conn, RESULTS) == results
        assert await _rows(conn, BATCHES) == batches
        assert await _rows(conn, SHARDS) == shards
        # One row per shard on disk; only failures (and reruns to come) per item.
        stored = await _rows(
            conn,
            "SELECT (SELECT count(*) FROM pgbatch.item_blocks),"
            " (SELECT count(*) FROM pgbatch.result_blocks),"
            " (SELECT count(*) FROM pgbatch.result_errors WHERE NOT retrying),"
            " (SELECT array_agg(seq ORDER BY seq) FROM pgbatch.result_errors"
            "  WHERE retrying AND batch_id = 3)",
        )
        # 12 item blocks (3+3+2+2+1+1); result blocks for every shard with results or
        # reopened by a retry (3+1+2+2+1+1); 2+2+2 failures; batch 3's 6 and 7 to rerun
        # (and batch 6's 0 and 1).
        assert stored == [(12, 10, 6, [6, 7])]

    ran: list[tuple[int, int]] = []
    app = pgbatch.App(settings=settings_for(empty_database, worker_beat_s=0.1))

    @app.task("work", max_attempts=2)
    async def work(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        ran.extend((ctx.batch_id, item.seq) for item in items)
        return [pgbatch.ok({"new": item.value}) for item in items]

    async with app:
        # Every API path reads the converted results as the old ones.
        for batch_id in (1, 2, 3, 4, 5, 6):
            expected = [(seq, ok, error) for b, seq, ok, _, error, _ in results if b == batch_id]
            got = [(seq, o.ok, o.error) async for seq, o in app.results(batch_id)]
            assert got == expected, batch_id
        failed = [(s, o.error, o.traceback) async for s, o in app.results(1, errors_only=True)]
        assert failed == [(1, "failed after 2 attempts: KeyError: 'p'", TRACE),
                          (4, "asked to fail", None)]  # fmt: skip
        outputs = [o.output async for _, o in app.results(1)]
        assert outputs == [{"out": 0}, None, None, "back\\slash \u00e9", None, [1, 2],
                           {"deep": {"a": [1]}}]  # fmt: skip
        _, groups, total = await app.error_groups(1, samples=5)
        assert total == 2
        assert [(g.error, g.items, list(g.samples), g.sample_tracebacks) for g in groups] == [
            ("failed after 2 attempts: KeyError: 'p'", 1, [(1, {"n": 1})], (TRACE,)),
            ("asked to fail", 1, [(4, {"n": 4})], (None,)),
        ]
        _, groups, total = await app.error_groups(4, samples=5)
        assert total == 0  # cancelled items are not failures

        # The running batches finish on the new layout: batch 2's running shard (its
        # lease expired) and queued one, and only batch 3's two items whose results the
        # retry had deleted.
        worker = app.worker(concurrency=4)
        running = asyncio.create_task(worker.run())
        try:
            done2 = await app.wait(2, timeout_s=30)
            done3 = await app.wait(3, timeout_s=30)
            done6 = await app.wait(6, timeout_s=30)
            assert sorted(s for b, s in ran if b == 6) == [0, 1]
            assert (done6.status, done6.items_ok, done6.items_failed) == ("succeeded", 2, 0)
            assert sorted(s for b, s in ran if b == 3) == [6, 7]
            assert sorted(s for b, s in ran if b == 2) == [2, 3, 4, 5]
            assert (done2.status, done2.items_ok, done2.items_failed) == ("succeeded", 6, 0)
            assert (done3.status, done3.items_ok, done3.items_failed) == ("succeeded", 8, 0)
            got3 = [o.output async for _, o in app.results(3)]
            assert got3 == [0, 1, 2, 3, "old 4", "old 5", {"new": [6, "x"]}, {"new": [7, "x"]}]
            # A retry of the converted batch 1 reruns its two failed items alone.
            ran.clear()
            assert await app.retry(1) == 2
            done1 = await app.wait(1, timeout_s=30)
            assert sorted(s for b, s in ran if b == 1) == [1, 4]
            assert (done1.status, done1.items_ok, done1.items_failed) == ("succeeded", 7, 0)
            got1 = [o.output async for _, o in app.results(1)]
            assert got1 == [{"out": 0}, {"new": {"n": 1}}, None, "back\\slash \u00e9",
                            {"new": {"n": 4}}, [1, 2], {"deep": {"a": [1]}}]  # fmt: skip
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)

        async with app.db.connection() as conn:
            for batch_id in (1, 2, 3, 4, 5, 6):
                check = await verify_batch(conn, batch_id)
                assert check.every_item_has_one_result, (batch_id, check)
            # The pruned batch's leftovers went with the upgrade: nothing to clean.
            assert await _rows(
                conn, "SELECT count(*) FROM pgbatch.item_blocks WHERE batch_id = 99"
            ) == [(0,)]
