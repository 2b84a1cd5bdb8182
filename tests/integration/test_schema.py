"""schema.sql is what the migrations produce; migrating is safe when many start at once."""

from __future__ import annotations

import asyncio
from importlib import resources
from typing import Any

import psycopg
import pytest

from pgbatch.db.database import Database
from pgbatch.db.migrations import applied_versions, available_migrations, migrate
from pgbatch.db.sessions import SessionTimeouts
from pgbatch.workloads import collections, documents, llm, vectors
from tests.helpers import fetch_one, wait_until

SHIPPED_COMPONENTS = [
    w.component
    for w in (collections.WORKLOAD, documents.WORKLOAD, llm.WORKLOAD, vectors.WORKLOAD)
    if w.component is not None
]

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default, is_identity
        FROM information_schema.columns WHERE table_schema = 'pgbatch'
        ORDER BY 1, 2""",
    "constraints": """
        SELECT cl.relname, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid
        JOIN pg_namespace n ON n.oid = cl.relnamespace
        WHERE n.nspname = 'pgbatch' ORDER BY 1, 2""",
    "indexes": """
        SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'pgbatch' ORDER BY 1""",
    # Storage parameters (autovacuum thresholds, 0010), each table's sorted.
    "reloptions": """
        SELECT relname, (SELECT array_agg(o ORDER BY o) FROM unnest(reloptions) o)
        FROM pg_class WHERE relnamespace = 'pgbatch'::regnamespace AND reloptions IS NOT NULL
        ORDER BY 1""",
}


def _catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    with psycopg.connect(url) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in CATALOG_QUERIES.items()}


async def _migrate_shipped_workloads(url: str) -> None:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await migrate(conn, components=SHIPPED_COMPONENTS)


def test_schema_sql_equals_the_migrations(database_url: str, empty_database: str) -> None:
    # schema.sql is pgbatch's schema with every shipped workload's tables.
    asyncio.run(_migrate_shipped_workloads(database_url))
    schema_sql = resources.files("pgbatch.db").joinpath("schema.sql").read_text()
    with psycopg.connect(empty_database, autocommit=True) as conn:
        conn.execute(schema_sql)
    from_schema = _catalog(empty_database)
    from_migrations = _catalog(database_url)
    assert from_schema["columns"], "the catalog query found no pgbatch tables"
    for part in CATALOG_QUERIES:
        assert from_schema[part] == from_migrations[part], part


@pytest.mark.asyncio
async def test_ten_processes_migrating_at_once_apply_each_migration_once(
    empty_database: str,
) -> None:
    conns = [
        await psycopg.AsyncConnection.connect(empty_database, autocommit=True) for _ in range(10)
    ]
    barrier = asyncio.Barrier(len(conns))

    async def one(conn: psycopg.AsyncConnection[Any]) -> list[int]:
        await barrier.wait()
        return await migrate(conn)

    try:
        applied = await asyncio.gather(*(one(c) for c in conns))
        expected = [m.version for m in available_migrations()]
        assert sorted(v for versions in applied for v in versions) == expected
        assert await applied_versions(conns[0]) == set(expected)
        assert await migrate(conns[0]) == []  # idempotent
    finally:
        for conn in conns:
            await conn.close()


@pytest.mark.asyncio
async def test_a_database_at_0002_with_queued_work_upgrades_in_place_to_0003(
    empty_database: str,
) -> None:
    # 0003 adds shards.tenant: existing shards must take their batch's tenant and stay
    # claimable by the fair claim, with nothing else changed.
    from pgbatch.db.shards import claim_shards

    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await migrate(conn, up_to=2) == [1, 2]
        for tenant in ("acme", "default"):
            await conn.execute(
                """
                WITH b AS (
                    INSERT INTO pgbatch.batches (tenant, task, shard_size, max_attempts,
                                                 lease_ttl_s, total_items, total_shards)
                    VALUES (%(tenant)s, 't', 2, 3, 30, 4, 2) RETURNING id
                ), i AS (
                    INSERT INTO pgbatch.items (batch_id, seq, payload)
                    SELECT b.id, g, to_json(%(tenant)s || g) FROM b, generate_series(0, 3) g
                )
                INSERT INTO pgbatch.shards (batch_id, shard_no, first_seq, last_seq, task,
                                            queue, priority, max_attempts, lease_ttl_s)
                SELECT b.id, g, g * 2, g * 2 + 1, 't', 'default', 0, 3, 30
                FROM b, generate_series(0, 1) g
                """,
                {"tenant": tenant},
            )
        before = await (await conn.execute("SELECT * FROM pgbatch.shards ORDER BY id")).fetchall()

        assert await migrate(conn, up_to=3) == [3]

        rows = await (
            await conn.execute(
                "SELECT s.tenant, b.tenant FROM pgbatch.shards s"
                " JOIN pgbatch.batches b ON b.id = s.batch_id ORDER BY s.id"
            )
        ).fetchall()
        assert rows == [("acme", "acme")] * 2 + [("default", "default")] * 2
        after = await (
            await conn.execute(
                "SELECT id, batch_id, shard_no, first_seq, last_seq, task, queue, priority,"
                " status, attempts, max_attempts, lease_ttl_s, lease_epoch, lease_expires_at,"
                " worker_id, retried, run_after, last_error, finished_at"
                " FROM pgbatch.shards ORDER BY id"
            )
        ).fetchall()
        assert after == before
        # The claim of this release reads 0004's column; later migrations come with it.
        applied = await migrate(conn)
        assert applied[0] == 4 and applied == sorted(applied)
        shards = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=10)
        assert sorted((s.tenant, [i.value for i in s.items]) for s in shards) == [
            ("acme", ["acme0", "acme1"]),
            ("acme", ["acme2", "acme3"]),
            ("default", ["default0", "default1"]),
            ("default", ["default2", "default3"]),
        ]


async def _fill_at_0002(conn: psycopg.AsyncConnection[Any]) -> int:
    """Write a batch, its items and a half-run shard as pgbatch 0002 stored them."""
    cur = await conn.execute(
        "INSERT INTO pgbatch.batches (tenant, task, shard_size, max_attempts, lease_ttl_s,"
        " total_items, total_shards, status) VALUES ('acme', 't', 2, 3, 30, 2, 1, 'running')"
        " RETURNING id"
    )
    row = await cur.fetchone()
    assert row is not None
    batch_id = int(row[0])
    await conn.execute(
        "INSERT INTO pgbatch.items (batch_id, seq, payload) VALUES (%s, 0, '{\"a\": 1}'),"
        " (%s, 1, '[2]')",
        (batch_id, batch_id),
    )
    await conn.execute(
        "INSERT INTO pgbatch.shards (batch_id, shard_no, first_seq, last_seq, task, queue,"
        " priority, max_attempts, lease_ttl_s, attempts, lease_epoch)"
        " VALUES (%s, 0, 0, 1, 't', 'default', 0, 3, 30, 2, 2)",
        (batch_id,),
    )
    return batch_id


@pytest.mark.asyncio
async def test_a_database_at_0002_with_data_upgrades_in_place_even_while_workers_hold_locks(
    empty_database: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await migrate(conn, up_to=2) == [1, 2]
        batch_id = await _fill_at_0002(conn)
    later = [m.version for m in available_migrations() if m.version > 2]
    assert 4 in later
    # A worker of the old version is mid-transaction on the shards table: the upgrade
    # must wait for it, though every pgbatch session gives up a lock wait after 100 ms.
    holder = await psycopg.AsyncConnection.connect(empty_database)
    await holder.execute("SELECT count(*) FROM pgbatch.shards")
    async with Database(empty_database, timeouts=SessionTimeouts(lock_timeout_ms=100)) as db:
        async with db.connection() as conn:
            upgrading = asyncio.create_task(migrate(conn))

            async def waiting_past_the_lock_timeout() -> bool:
                if upgrading.done():
                    upgrading.result()  # a MigrationError (lock timeout) fails the test here
                    raise AssertionError("the upgrade did not wait for the lock")
                # Its own connection: pg_stat_activity is read once per transaction.
                row = await fetch_one(
                    empty_database,
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"
                    " AND clock_timestamp() - query_start > interval '500 ms'",
                )
                return bool(row and row[0])

            try:
                await wait_until(waiting_past_the_lock_timeout, 30)
            finally:
                await holder.rollback()
                await holder.close()
            assert await upgrading == later
            cur = await conn.execute(
                "SELECT b.tenant, b.status, s.attempts, s.lease_epoch, s.lease_refunds,"
                " (SELECT json_agg(i.payload ORDER BY i.seq)::text FROM pgbatch.items i"
                "  WHERE i.batch_id = b.id)"
                " FROM pgbatch.batches b JOIN pgbatch.shards s ON s.batch_id = b.id"
                " WHERE b.id = %s",
                (batch_id,),
            )
            assert await cur.fetchone() == ("acme", "running", 2, 2, 0, '[{"a": 1}, [2]]')
            assert await applied_versions(conn) == {m.version for m in available_migrations()}


@pytest.mark.asyncio
async def test_a_workload_used_by_an_app_migrates_with_it_once(database_url: str) -> None:
    import pgbatch
    from pgbatch.db.migrations import pending_migrations
    from tests.conftest import settings_for

    component = collections.WORKLOAD.component
    assert component is not None
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        assert await pending_migrations(conn, [component]) == {"collections": [1]}
    # Two apps opening at once: the runner's lock lets one apply, the other finds it done.
    apps = [pgbatch.App(settings=settings_for(database_url)) for _ in range(2)]
    for app in apps:
        app.use(collections.WORKLOAD)
        app.use(collections.WORKLOAD)  # a second use changes nothing
        assert [w.name for w in app.workloads] == ["collections"]
        assert collections.TASK in app.tasks
    await asyncio.gather(*(app.open() for app in apps))
    try:
        assert await collections.create_collection(apps[0], "c1")
        assert not await collections.create_collection(apps[1], "c1")
    finally:
        for app in apps:
            await app.close()
    rows = await fetch_one(
        database_url,
        "SELECT count(*), min(component), min(version) FROM pgbatch.workload_migrations",
    )
    assert rows == (1, "collections", 1)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        assert await pending_migrations(conn, [component]) == {}
        # pgbatch's own sequence is untouched by a workload's.
        assert await applied_versions(conn) == {m.version for m in available_migrations()}
