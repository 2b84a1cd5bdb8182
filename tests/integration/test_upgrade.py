"""A database made by pgbatch dbe590b, with every kind of data, upgrades in place and keeps it.

dbe590b had migrations 0001-0002 and made the workload tables at run time in the search
path's schema (tests/fixtures/dbe590b_workloads.sql is that DDL, verbatim). Opening an
App of this release that uses both shipped workloads must apply pgbatch's 0003-0004 and
the workloads' migrations, move the workload tables into pgbatch's schema, and keep
every row: finished and queued batches with their items, shards, results and callbacks,
collections and their items, documents and their references.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import migrate
from pgbatch.workloads import collections, documents
from tests.conftest import settings_for

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "dbe590b_workloads.sql"

CORE_ROWS = {
    "batches": "SELECT id, tenant, task, status, total_items, total_shards, shards_done,"
    " items_ok, items_failed, run_no, on_complete, finished_at IS NOT NULL"
    " FROM pgbatch.batches ORDER BY id",
    "items": "SELECT batch_id, seq, payload::text FROM pgbatch.items ORDER BY 1, 2",
    "shards": "SELECT id, batch_id, shard_no, first_seq, last_seq, status, attempts"
    " FROM pgbatch.shards ORDER BY id",
    "results": "SELECT batch_id, seq, ok, output::text, error FROM pgbatch.results ORDER BY 1, 2",
    "callbacks": "SELECT batch_id, run_no, name, batch_status, status FROM pgbatch.callbacks",
}


async def _fill_as_dbe590b(conn: psycopg.AsyncConnection[Any]) -> tuple[uuid.UUID, uuid.UUID]:
    assert await migrate(conn, up_to=2) == [1, 2]
    await conn.execute(
        """
        INSERT INTO pgbatch.batches (tenant, task, status, shard_size, max_attempts,
            lease_ttl_s, total_items, total_shards, shards_done, items_ok, items_failed,
            on_complete, started_at, finished_at)
        VALUES ('acme', 'summarize', 'succeeded', 2, 3, 30, 3, 2, 2, 2, 1, 'notify',
                now(), now()),
               ('default', 'summarize', 'pending', 2, 3, 30, 2, 1, 0, 0, 0, NULL,
                NULL, NULL);
        INSERT INTO pgbatch.items (batch_id, seq, payload)
        VALUES (1, 0, '{"p": "a"}'), (1, 1, '{"p": "b"}'), (1, 2, '[3]'),
               (2, 0, '"x"'), (2, 1, '"y"');
        INSERT INTO pgbatch.shards (batch_id, shard_no, first_seq, last_seq, task, queue,
            priority, status, attempts, max_attempts, lease_ttl_s, finished_at)
        VALUES (1, 0, 0, 1, 'summarize', 'default', 0, 'done', 1, 3, 30, now()),
               (1, 1, 2, 2, 'summarize', 'default', 0, 'done', 2, 3, 30, now()),
               (2, 0, 0, 1, 'summarize', 'default', 0, 'queued', 0, 3, 30, NULL);
        INSERT INTO pgbatch.results (batch_id, seq, ok, output, error)
        VALUES (1, 0, true, '"A"', NULL), (1, 1, true, '{"n": 1}', NULL),
               (1, 2, false, NULL, 'boom');
        INSERT INTO pgbatch.callbacks (batch_id, run_no, name, batch_status, status)
        VALUES (1, 1, 'notify', 'succeeded', 'done');
        """
    )
    await conn.execute(FIXTURE.read_text())
    parent = documents.document_key({"type": "school", "id": "S-1"})
    child = documents.document_key({"type": "student", "id": "P-1"})
    await conn.execute(
        """
        INSERT INTO collections (id, name) VALUES ('prospects', 'P'), ('shortlist', NULL);
        INSERT INTO collection_items VALUES ('prospects', 'acme'), ('prospects', 'globex'),
            ('shortlist', 'acme');
        INSERT INTO collection_copy_stats VALUES (1, 1, 5, 2, 0);
        """
    )
    await conn.execute(
        "INSERT INTO documents (key, partition, type, identity, body) VALUES"
        ' (%s, \'default\', \'school\', \'{"type": "school", "id": "S-1"}\', \'{"n": 1}\'),'
        ' (%s, \'default\', \'student\', \'{"type": "student", "id": "P-1"}\', \'{"n": 2}\')',
        (parent, child),
    )
    await conn.execute("INSERT INTO document_references VALUES (%s, %s)", (child, parent))
    return parent, child


async def _rows(conn: psycopg.AsyncConnection[Any], sql: str) -> list[tuple[Any, ...]]:
    return await (await conn.execute(sql)).fetchall()


@pytest.mark.asyncio
async def test_a_dbe590b_database_upgrades_in_place_with_every_row(empty_database: str) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        parent, child = await _fill_as_dbe590b(conn)
        before = {name: await _rows(conn, sql) for name, sql in CORE_ROWS.items()}

    # Two processes of the new release open at once, as workers starting together would.
    apps = [pgbatch.App(settings=settings_for(empty_database)) for _ in range(2)]
    for app in apps:
        app.use(collections.WORKLOAD)
        app.use(documents.WORKLOAD)
    await asyncio.gather(*(app.open() for app in apps))
    app = apps[0]
    try:
        async with app.db.connection() as conn:
            after = {name: await _rows(conn, sql) for name, sql in CORE_ROWS.items()}
            assert after == before
            assert await _rows(conn, "SELECT DISTINCT tenant FROM pgbatch.shards ORDER BY 1") == [
                ("acme",),
                ("default",),
            ]
            moved = await _rows(
                conn,
                "SELECT to_regclass('public.collections'), to_regclass('public.documents'),"
                " to_regprocedure('public.documents_upsert(uuid[],text[],text[],jsonb[],jsonb[])')",
            )
            assert moved == [(None, None, None)]
            assert await _rows(
                conn, "SELECT tenant, id, name FROM pgbatch.collections ORDER BY id"
            ) == [("default", "prospects", "P"), ("default", "shortlist", None)]
            assert await _rows(
                conn, "SELECT collection_id, item_id FROM pgbatch.collection_items ORDER BY 1, 2"
            ) == [("prospects", "acme"), ("prospects", "globex"), ("shortlist", "acme")]
            assert await _rows(conn, "SELECT * FROM pgbatch.collection_copy_stats") == [
                (1, 1, 5, 2, 0)
            ]
            assert await _rows(
                conn, "SELECT key, body::text FROM pgbatch.documents ORDER BY type"
            ) == [(parent, '{"n": 1}'), (child, '{"n": 2}')]
            assert await _rows(conn, "SELECT * FROM pgbatch.document_references") == [
                (child, parent)
            ]
            components = await _rows(
                conn,
                "SELECT component, version FROM pgbatch.workload_migrations ORDER BY 1",
            )
            assert components == [("collections", 1), ("documents", 1)]

        # What was there works with this release: results read back, a copy between the
        # old collections runs, a document posts with a reference to an old one, and the
        # queued batch of the old release is claimed and finished.
        assert [(s, o.ok) async for s, o in app.results(1)] == [(0, True), (1, True), (2, False)]

        @app.task("summarize")
        async def summarize(
            items: list[pgbatch.Item], _: pgbatch.ShardContext
        ) -> list[pgbatch.Outcome]:
            return [pgbatch.ok(item.value) for item in items]

        worker = app.worker(concurrency=4)
        running = asyncio.create_task(worker.run())
        try:
            finished = await app.wait(2, timeout_s=30)
            copy = await collections.submit_copy(
                app, source="prospects", target="shortlist", item_ids=None
            )
            await app.wait(copy.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        assert (finished.status, finished.items_ok) == ("succeeded", 2)
        report = await collections.copy_report(app, copy.id)
        assert (report.inserted, report.already_present) == (1, 1)
        async with documents.DocumentWriter(app.db) as writer:
            outcome = await writer.post(
                {"type": "student", "id": "P-2"},
                {"n": 3},
                references=[{"type": "school", "id": "S-1"}],
            )
        assert outcome.written, outcome
    finally:
        for opened in apps:
            await opened.close()
