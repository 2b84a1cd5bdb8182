"""Issue 12 §2-3 in the library: App.submit's name and metadata, their index-backed filters,
and a database at migration 0004 with batches upgrading to 0007 with its data."""

from __future__ import annotations

from typing import Any

import orjson
import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import migrate
from pgbatch.db.queries import query
from pgbatch.errors import InvalidBatchError
from pgbatch.models import BatchFilter
from tests.conftest import settings_for
from tests.integration.test_worker import running


def _echo_app(url: str) -> pgbatch.App:
    app = pgbatch.App(settings=settings_for(url))

    @app.task()
    async def echo(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(i.value) for i in items]

    return app


@pytest.mark.asyncio
async def test_app_submit_labels_and_lists_by_them(database_url: str) -> None:
    async with _echo_app(database_url) as app:
        first = await app.submit("echo", [1], name="a", metadata={"k": "v", "team": "x"})
        await app.submit("echo", [1], name="b", metadata={"k": "w"})
        assert (first.name, first.metadata) == ("a", {"k": "v", "team": "x"})
        found = await app.list_batches(BatchFilter(metadata={"k": "v"}))
        assert [b.id for b in found] == [first.id]
        assert [b.id for b in await app.list_batches(BatchFilter(name="a"))] == [first.id]
        with pytest.raises(InvalidBatchError) as refused:
            await app.submit("echo", [1], metadata={"k": "x" * 513})
        assert refused.value.field == "metadata.k"
        with pytest.raises(InvalidBatchError) as refused:
            await app.submit("echo", [1], name="")
        assert refused.value.field == "name"
        async with app.db.connection() as conn:
            row = await (await conn.execute("SELECT count(*) FROM pgbatch.batches")).fetchone()
        assert row == (2,)  # the refused submissions wrote nothing


@pytest.mark.asyncio
async def test_the_label_filters_use_their_indexes(database_url: str) -> None:
    async with _echo_app(database_url) as app, app.db.connection() as conn:
        # Enough rows that the statistics are not empty; seq scans priced out so that the
        # plan shows whether an index can answer at all (on a tiny table it need not).
        await conn.execute(
            "INSERT INTO pgbatch.batches (tenant, task, shard_size, max_attempts, lease_ttl_s,"
            " name, metadata)"
            " SELECT 't' || (n % 5), 'echo', 1, 1, 30, 'n' || (n % 50),"
            " jsonb_build_object('k', (n % 100)::text) FROM generate_series(1, 2000) n"
        )
        await conn.execute("ANALYZE pgbatch.batches")
        await conn.execute("SET enable_seqscan = off")
        base: dict[str, Any] = {
            "tenant": "t1",
            "status": None,
            "task": None,
            "name": None,
            "metadata": None,
            "created_after": None,
            "created_before": None,
            "before_id": None,
            "limit": 20,
        }
        for filters, index in (
            ({"metadata": orjson.dumps({"k": "7"}).decode()}, "batches_metadata_idx"),
            ({"name": "n7"}, "batches_tenant_name_id_idx"),
        ):
            cur = await conn.execute(
                "EXPLAIN " + query("batch_list"), {**base, **filters}, prepare=False
            )
            plan = "\n".join(row[0] for row in await cur.fetchall())
            assert index in plan, plan


@pytest.mark.asyncio
async def test_a_database_at_0004_with_batches_upgrades_to_0007_with_its_data(
    empty_database: str,
) -> None:
    columns = (
        "SELECT id, tenant, task, status, total_items, items_ok, items_failed, version"
        " FROM pgbatch.batches ORDER BY id"
    )
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await migrate(conn, up_to=4) == [1, 2, 3, 4]
        # As 0004 left them: a finished batch, a cancelled one (its items counted failed
        # then) and a queued one with its items and shard.
        await conn.execute(
            """
            INSERT INTO pgbatch.batches (tenant, task, status, shard_size, max_attempts,
                lease_ttl_s, total_items, total_shards, shards_done, items_ok, items_failed,
                started_at, finished_at)
            VALUES ('acme', 'echo', 'succeeded', 2, 3, 30, 2, 1, 1, 2, 0, now(), now()),
                   ('acme', 'echo', 'cancelled', 2, 3, 30, 2, 1, 1, 0, 2, now(), now()),
                   ('default', 'echo', 'pending', 2, 3, 30, 2, 1, 0, 0, 0, NULL, NULL);
            INSERT INTO pgbatch.items (batch_id, seq, payload)
            VALUES (3, 0, '"x"'), (3, 1, '"y"');
            INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task,
                queue, priority, max_attempts, lease_ttl_s)
            VALUES (3, 'default', 0, 0, 1, 'echo', 'default', 0, 3, 30);
            """
        )
        before = await (await conn.execute(columns)).fetchall()
        applied = await migrate(conn)
        assert 7 in applied and applied == sorted(applied)
        assert await (await conn.execute(columns)).fetchall() == before
        labels = await (
            await conn.execute(
                "SELECT name, metadata, items_cancelled FROM pgbatch.batches ORDER BY id"
            )
        ).fetchall()
        assert labels == [(None, {}, 0)] * 3

    # The release runs the queued batch and labels new ones beside the old.
    async with _echo_app(empty_database) as app:
        old = await app.get_batch(1)
        assert (old.name, old.metadata, old.items_cancelled) == (None, {}, 0)
        new = await app.submit("echo", ["z"], name="after", metadata={"era": "0007"})
        async with running(app):
            queued = await app.wait(3, timeout_s=30)
            await app.wait(new.id, timeout_s=30)
        assert (queued.status, queued.items_ok) == ("succeeded", 2)
        assert [b.id for b in await app.list_batches(BatchFilter(metadata={"era": "0007"}))] == [
            new.id
        ]
