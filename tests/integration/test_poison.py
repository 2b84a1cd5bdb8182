"""Issue 9: a shard no claim can read is marked dead, and the queue moves on for everyone.

Reading a real poison shard means building a text value past PostgreSQL's 1 GB; the test
fakes one cheaply: a trigger fails, with the same error, every statement that would set
that one shard running (which is what every claim taking it did).
"""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import bury_shard
from tests.conftest import settings_for
from tests.helpers import fetch_all, fetch_one, wait_until

POISON_TRIGGER = """
CREATE FUNCTION pgbatch.test_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'running' AND NEW.id = %(shard_id)s THEN
        RAISE EXCEPTION 'string buffer exceeds maximum allowed length'
            USING ERRCODE = %(sqlstate)s;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_poison BEFORE UPDATE ON pgbatch.shards
    FOR EACH ROW EXECUTE FUNCTION pgbatch.test_poison();
"""


async def _poison(database_url: str, shard_id: int, sqlstate: str) -> None:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # Literal values: a function body cannot take bind parameters.
        sql = POISON_TRIGGER.replace("%(shard_id)s", str(shard_id)).replace(
            "%(sqlstate)s", f"'{sqlstate}'"
        )
        await conn.execute(sql)


def _app(database_url: str) -> pgbatch.App:
    app = pgbatch.App(settings=settings_for(database_url))

    @app.task("t", shard_size=5)
    async def echo(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(item.value) for item in items]

    return app


@pytest.mark.asyncio
async def test_a_shard_no_claim_can_read_is_dead_and_another_tenants_batch_completes(
    database_url: str,
) -> None:
    app = _app(database_url)
    await app.open()
    worker = app.worker(concurrency=4)
    try:
        # The poison batch comes first and at the top priority: every claim takes it first.
        poison = await app.submit("t", range(10), tenant="acme", priority=2**31 - 1)
        other = await app.submit("t", range(20), tenant="other")
        first_shard = await fetch_one(
            database_url,
            "SELECT id FROM pgbatch.shards WHERE batch_id = %s AND shard_no = 0",
            (poison.id,),
        )
        await _poison(database_url, first_shard[0], "54000")
        running = asyncio.create_task(worker.run())

        async def both_final() -> bool:
            return all([(await app.get_batch(b.id)).is_final for b in (poison, other)])

        await wait_until(both_final, 30, message=lambda: f"worker stats: {worker.stats}")
        worker.request_stop()
        await running

        done_other = await app.get_batch(other.id)
        assert (done_other.status, done_other.items_ok, done_other.items_failed) == (
            "succeeded", 20, 0,
        )  # fmt: skip
        done_poison = await app.get_batch(poison.id)
        # Counted once: one dead shard of two, its 5 items failed, the other shard's 5 ok.
        assert (
            done_poison.status,
            done_poison.shards_done,
            done_poison.shards_dead,
            done_poison.items_ok,
            done_poison.items_failed,
        ) == ("failed", 2, 1, 5, 5)
        status, attempts, last_error = await fetch_one(
            database_url,
            "SELECT status, attempts, last_error FROM pgbatch.shards WHERE id = %s",
            (first_shard[0],),
        )
        assert (status, attempts) == ("dead", 1)
        assert "string buffer exceeds maximum allowed length" in last_error
        # Every item of the dead shard has exactly one result: the claim's error.
        results = await fetch_all(
            database_url,
            "SELECT seq, ok, error FROM pgbatch.results WHERE batch_id = %s ORDER BY seq",
            (poison.id,),
        )
        assert [r[0] for r in results] == list(range(10))
        assert all(not ok and "string buffer" in error for _, ok, error in results[:5])
        assert all(ok for _, ok, _ in results[5:])
        assert worker.stats.shards_buried == 1
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_a_claim_error_that_is_not_the_shards_leaves_it_queued_and_the_queue_moves(
    database_url: str,
) -> None:
    # Out of memory (53200) is the server's state, not the shard's data: nothing is killed,
    # but the other shards (another tenant's batch, the poison batch's second) still run.
    app = _app(database_url)
    await app.open()
    worker = app.worker(concurrency=4)
    try:
        poison = await app.submit("t", range(10), tenant="acme", priority=2**31 - 1)
        other = await app.submit("t", range(20), tenant="other")
        first_shard = await fetch_one(
            database_url,
            "SELECT id FROM pgbatch.shards WHERE batch_id = %s AND shard_no = 0",
            (poison.id,),
        )
        await _poison(database_url, first_shard[0], "53200")
        running = asyncio.create_task(worker.run())

        async def other_done_and_poison_half() -> bool:
            p = await app.get_batch(poison.id)
            return (await app.get_batch(other.id)).is_final and p.shards_done == 1

        await wait_until(other_done_and_poison_half, 30, message=lambda: str(worker.stats))
        worker.request_stop()
        await running
        assert (await app.get_batch(other.id)).items_ok == 20
        row = await fetch_one(
            database_url, "SELECT status FROM pgbatch.shards WHERE id = %s", (first_shard[0],)
        )
        assert row[0] == "queued"
        assert worker.stats.shards_buried == 0
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_bury_is_fenced_on_a_queued_shard(app: pgbatch.App) -> None:
    @app.task("t")
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    batch = await app.submit("t", range(3), shard_size=1)
    async with app.db.connection() as conn:
        ids = [r[0] for r in await (await conn.execute(
            "SELECT id FROM pgbatch.shards WHERE batch_id = %s ORDER BY id", (batch.id,)
        )).fetchall()]  # fmt: skip
        await conn.execute("UPDATE pgbatch.shards SET status = 'running' WHERE id = %s", (ids[0],))
        async with conn.transaction():
            assert not await bury_shard(conn, ids[0], error="e")  # running: not touched
        async with conn.transaction():
            assert await bury_shard(conn, ids[1], error="e")
        async with conn.transaction():
            assert not await bury_shard(conn, ids[1], error="e")  # already dead: once only
    after = await app.get_batch(batch.id)
    assert (after.shards_done, after.shards_dead, after.items_failed) == (1, 1, 1)
