"""The collection-copy workload, and the at-commit statements it is built on (real PostgreSQL)."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import (
    ShardCompletion,
    claim_shards,
    complete_shards,
    rescue_expired_shards,
)
from pgbatch.engine.completer import Completer
from pgbatch.engine.context import ShardContext
from pgbatch.models import ClaimedShard, ShardStatus
from pgbatch.workloads import collections as copies
from tests.helpers import REPO_ROOT, register_noop, subprocess_env, wait_until

# Small ranges, so that a few thousand keys make several shards of several ranges.
KEYS_PER_ITEM = 50
SOURCE_KEYS = 1_234


@asynccontextmanager
async def running(app: pgbatch.App, *, workers: int = 1) -> AsyncIterator[list[Any]]:
    """Run `workers` workers of `app` in this event loop for the duration of the block."""
    started = [app.worker(concurrency=8) for _ in range(workers)]
    tasks = [asyncio.create_task(w.run()) for w in started]
    try:
        yield started
    finally:
        for worker in started:
            worker.request_stop()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)


async def _setup(app: pgbatch.App, *collections: str) -> None:
    copies.install(app)
    await copies.create_tables(app)  # the fixture's app is open already: no on_open
    for collection in collections:
        assert await copies.create_collection(app, collection)


async def _keys(app: pgbatch.App, collection: str) -> set[str]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT item_id FROM pgbatch.collection_items WHERE collection_id = %s", (collection,)
        )
        return {row[0] for row in await cur.fetchall()}


async def _copy(app: pgbatch.App, **kwargs: Any) -> copies.CopyReport:
    batch = await copies.submit_copy(app, keys_per_item=KEYS_PER_ITEM, **kwargs)
    done = await app.wait(batch.id, timeout_s=30)
    assert done.status == "succeeded", done
    return await copies.copy_report(app, batch.id)


def _seeded(count: int, first: int = 0) -> set[str]:
    return {f"company-{n:09d}" for n in range(first, first + count)}


@pytest.mark.asyncio
async def test_copy_all_then_again_inserts_nothing_the_second_time(app: pgbatch.App) -> None:
    await _setup(app, "src", "dst")
    assert await copies.seed_items(app, "src", SOURCE_KEYS) == SOURCE_KEYS
    async with running(app):
        first = await _copy(app, source="src", target="dst", item_ids=None)
        second = await _copy(app, source="src", target="dst", item_ids=None)
    ranges = -(-SOURCE_KEYS // KEYS_PER_ITEM)
    assert (first.source, first.target, first.status) == ("src", "dst", "succeeded")
    assert (first.ranges_done, first.ranges_total) == (ranges, ranges)
    assert (first.inserted, first.already_present, first.not_in_source) == (SOURCE_KEYS, 0, 0)
    assert (second.inserted, second.already_present) == (0, SOURCE_KEYS)
    assert await _keys(app, "dst") == await _keys(app, "src") == _seeded(SOURCE_KEYS)
    async with app.db.connection() as conn:
        # One stats row per shard of each copy: no row shared by two shards.
        cur = await conn.execute(
            "SELECT count(*), count(DISTINCT (batch_id, shard_id))"
            " FROM pgbatch.collection_copy_stats"
        )
        rows, distinct = await cur.fetchone() or (0, 0)
        # Counted by the batches: a done shard's row is deleted by its completion.
        cur = await conn.execute("SELECT sum(shards_done)::int FROM pgbatch.batches")
        (shards,) = await cur.fetchone() or (0,)
    assert rows == distinct == shards == 2 * -(-ranges // copies.RANGES_PER_SHARD)


@pytest.mark.asyncio
async def test_copy_a_list_copies_only_listed_keys_the_source_holds(app: pgbatch.App) -> None:
    await _setup(app, "src", "dst")
    await copies.seed_items(app, "src", 300)
    listed = [f"company-{n:09d}" for n in range(0, 300, 3)]  # 100 keys
    # Duplicates count once; a key the source does not hold is reported, not copied.
    report = await _copy_running(
        app, source="src", target="dst", item_ids=[*listed, listed[0], "company-x"]
    )
    assert (report.inserted, report.already_present, report.not_in_source) == (100, 0, 1)
    assert report.ranges_total == 3  # 101 distinct ids in items of 50
    assert await _keys(app, "dst") == set(listed)


async def _copy_running(app: pgbatch.App, **kwargs: Any) -> copies.CopyReport:
    async with running(app):
        return await _copy(app, **kwargs)


@pytest.mark.asyncio
async def test_overlapping_targets_count_what_was_already_there(app: pgbatch.App) -> None:
    await _setup(app, "a", "b", "dst")
    await copies.seed_items(app, "a", 600)  # 0..599
    await copies.seed_items(app, "b", 600, first=400)  # 400..999
    await copies.add_items(app, "dst", [f"company-{n:09d}" for n in range(500, 550)])
    async with running(app, workers=2):
        # Both copies run at once, into one target, through two completers.
        batches = [
            await copies.submit_copy(
                app, source=source, target="dst", item_ids=None, keys_per_item=KEYS_PER_ITEM
            )
            for source in ("a", "b")
        ]
        for batch in batches:
            assert (await app.wait(batch.id, timeout_s=30)).status == "succeeded"
    reports = [await copies.copy_report(app, b.id) for b in batches]
    # 1,000 distinct keys, 50 of them already in the target: each key is inserted once.
    assert sum(r.inserted for r in reports) == 950
    assert sum(r.already_present for r in reports) == 1200 - 950
    assert await _keys(app, "dst") == _seeded(1000)


@pytest.mark.asyncio
async def test_bad_input_names_its_field_and_writes_nothing(app: pgbatch.App) -> None:
    await _setup(app, "src", "dst")
    await copies.seed_items(app, "src", 10)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"source": "nope", "target": "dst", "item_ids": None}, "source"),
        ({"source": "src", "target": "nope", "item_ids": None}, "target"),
        ({"source": "src", "target": "src", "item_ids": None}, "target"),
        ({"source": "", "target": "dst", "item_ids": None}, "source"),
        ({"source": "src", "target": "dst", "item_ids": []}, "item_ids"),
        ({"source": "src", "target": "dst", "item_ids": "company-1"}, "item_ids"),
        ({"source": "src", "target": "dst", "item_ids": ["ok", 7]}, "item_ids"),
        ({"source": "src", "target": "dst", "item_ids": None, "keys_per_item": 0}, "keys_per_item"),
    ]
    for kwargs, field in cases:
        with pytest.raises(pgbatch.InvalidBatchError) as raised:
            await copies.submit_copy(app, **kwargs)
        assert raised.value.field == field, (kwargs, raised.value)
    async with app.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pgbatch.batches")
        assert await cur.fetchone() == (0,)
    assert await _keys(app, "dst") == set()


@pytest.mark.asyncio
async def test_an_empty_source_is_an_empty_batch_finished_at_once(app: pgbatch.App) -> None:
    await _setup(app, "src", "dst")
    batch = await copies.submit_copy(app, source="src", target="dst", item_ids=None)
    assert (batch.total_items, batch.status, batch.is_final) == (0, "succeeded", True)
    report = await copies.copy_report(app, batch.id)
    assert (report.inserted, report.already_present, report.finished) == (0, 0, True)


@pytest.mark.asyncio
async def test_the_copy_runs_for_its_tenant_and_the_report_is_scoped(app: pgbatch.App) -> None:
    register_noop(app)
    copies.install(app)
    await copies.create_tables(app)
    for collection in ("src", "dst"):
        assert await copies.create_collection(app, collection, tenant="acme")
    await copies.seed_items(app, "src", 5, tenant="acme")
    batch = await copies.submit_copy(
        app, source="src", target="dst", item_ids=None, tenant="acme", idempotency_key="k1"
    )
    again = await copies.submit_copy(
        app, source="src", target="dst", item_ids=None, tenant="acme", idempotency_key="k1"
    )
    assert again.id == batch.id and batch.tenant == "acme"
    assert (await copies.copy_report(app, batch.id, tenant="acme")).ranges_total == 1
    with pytest.raises(pgbatch.BatchNotFoundError):
        await copies.copy_report(app, batch.id, tenant="other")
    other = await app.submit("t", [1])
    with pytest.raises(pgbatch.InvalidBatchError) as raised:
        await copies.copy_report(app, other.id)
    assert raised.value.field == "batch_id"


# -- the fence: a zombie's at-commit statement writes nothing ----------------------------


async def _claim(app: pgbatch.App, worker: str) -> ClaimedShard:
    async with app.db.connection() as conn:
        [shard] = await claim_shards(
            conn, worker_id=worker, queues=["default"], tasks=[copies.TASK], limit=1
        )
    return shard


async def _run_handler(shard: ClaimedShard) -> ShardCompletion:
    """Run the copy handler on a claimed shard, as the worker does, and build its completion."""
    ctx = ShardContext(
        batch_id=shard.batch_id,
        shard_id=shard.id,
        attempt=shard.attempts,
        lease_epoch=shard.lease_epoch,
        task=shard.task,
    )
    outcomes = await copies.copy_collection_shard(list(shard.items), ctx)
    return ShardCompletion.build(
        shard.id,
        shard.batch_id,
        shard.lease_epoch,
        ShardStatus.DONE,
        [(item.seq, outcome) for item, outcome in zip(shard.items, outcomes, strict=True)],
        ctx.writes,
        statements=ctx.statements,
    )


async def _complete(app: pgbatch.App, completion: ShardCompletion) -> set[tuple[int, int]]:
    async def work(conn: psycopg.AsyncConnection[Any]) -> set[tuple[int, int]]:
        return (await complete_shards(conn, [completion])).accepted

    return await app.db.run_in_transaction(work)


@pytest.mark.asyncio
async def test_a_zombie_copy_writes_nothing_even_when_it_completes_first(
    app: pgbatch.App,
) -> None:
    await _setup(app, "src", "dst")
    await copies.seed_items(app, "src", 100)
    batch = await copies.submit_copy(
        app, source="src", target="dst", item_ids=None, keys_per_item=100
    )
    zombie = await _run_handler(await _claim(app, "A"))
    async with app.db.connection() as conn:
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 second'"
        )
        assert await rescue_expired_shards(conn) == 1
    holder = await _run_handler(await _claim(app, "B"))
    assert holder.lease_epoch == zombie.lease_epoch + 1

    # A finishes after B took the shard over, but before B completes: the fence alone
    # must keep its statement from running.
    assert await _complete(app, zombie) == set()
    assert await _keys(app, "dst") == set()
    assert (await copies.copy_report(app, batch.id)).inserted == 0

    assert await _complete(app, holder) == {(holder.shard_id, holder.lease_epoch)}
    assert await _complete(app, zombie) == set()  # and late again: still nothing
    report = await copies.copy_report(app, batch.id)
    assert (report.status, report.inserted, report.already_present) == ("succeeded", 100, 0)
    assert await _keys(app, "dst") == _seeded(100)


# -- at-commit statements in the engine ----------------------------------------------------


async def _noop_completions(app: pgbatch.App, count: int) -> list[ShardCompletion]:
    """Claim `count` one-item shards of task "t" and return their (empty) completions."""
    await app.submit("t", range(count), shard_size=1)
    async with app.db.connection() as conn:
        shards = await claim_shards(
            conn, worker_id="W", queues=["default"], tasks=["t"], limit=count
        )
    assert len(shards) == count
    return [
        ShardCompletion.build(
            s.id,
            s.batch_id,
            s.lease_epoch,
            ShardStatus.DONE,
            [(i.seq, pgbatch.ok()) for i in s.items],
        )
        for s in shards
    ]


def _with_statements(completion: ShardCompletion, *statements: tuple[str, Any]) -> ShardCompletion:
    ctx = ShardContext(
        batch_id=completion.batch_id,
        shard_id=completion.shard_id,
        attempt=1,
        lease_epoch=completion.lease_epoch,
        task="t",
    )
    for statement, params in statements:
        ctx.execute_at_commit(statement, params)
    return dataclasses.replace(completion, writes=(), statements=ctx.statements)


_LOG = "INSERT INTO at_commit_log (shard_id, step) VALUES (%s, %s)"


async def _create_log(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        await conn.execute(
            "CREATE TABLE at_commit_log (n bigserial PRIMARY KEY, shard_id bigint, step int)"
        )


async def _log(app: pgbatch.App) -> list[tuple[int, int]]:
    async with app.db.connection() as conn:
        cur = await conn.execute("SELECT shard_id, step FROM at_commit_log ORDER BY n")
        return list(await cur.fetchall())


@pytest.mark.asyncio
async def test_statements_run_by_shard_id_then_in_queue_order(app: pgbatch.App) -> None:
    register_noop(app)
    await _create_log(app)
    first, second, fenced_out = await _noop_completions(app, 3)
    fenced_out = dataclasses.replace(
        fenced_out,
        lease_epoch=fenced_out.lease_epoch + 1,  # an epoch it does not hold
        writes=(),
        statements=(),
    )
    flush = [
        # Given out of order: they must run by shard id, then in the order queued.
        _with_statements(second, (_LOG, (second.shard_id, 1)), (_LOG, (second.shard_id, 2))),
        _with_statements(fenced_out, (_LOG, (fenced_out.shard_id, 1))),
        _with_statements(first, (_LOG, (first.shard_id, 1)), (_LOG, (first.shard_id, 2))),
    ]

    async def work(conn: psycopg.AsyncConnection[Any]) -> set[tuple[int, int]]:
        return (await complete_shards(conn, flush)).accepted

    assert len(await app.db.run_in_transaction(work)) == 2
    assert await _log(app) == [
        (first.shard_id, 1), (first.shard_id, 2), (second.shard_id, 1), (second.shard_id, 2),
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_a_failing_statement_fails_only_its_own_completion(app: pgbatch.App) -> None:
    register_noop(app)
    await _create_log(app)
    good_a, bad, good_b, unadaptable = await _noop_completions(app, 4)
    flush = [
        _with_statements(good_a, (_LOG, (good_a.shard_id, 1))),
        # The server rejects this one's second statement...
        _with_statements(bad, (_LOG, (bad.shard_id, 1)), (_LOG, ("not a number", 2))),
        _with_statements(good_b, (_LOG, (good_b.shard_id, 1))),
        # ...and psycopg cannot even send this one's.
        _with_statements(unadaptable, (_LOG, (unadaptable.shard_id, object()))),
    ]
    completer = Completer(app.db, max_batch=len(flush), max_delay_ms=1000)
    completer.start()
    try:
        outcomes = await asyncio.gather(
            *(completer.complete(c) for c in flush), return_exceptions=True
        )
    finally:
        await completer.stop()
    # One flush, whose failure was isolated: each completion then committed alone.
    assert (completer.stats.flushes, completer.isolated_flushes) == (1, 1)
    by_shard = {c.shard_id: o for c, o in zip(flush, outcomes, strict=True)}
    assert isinstance(by_shard[bad.shard_id], psycopg.errors.InvalidTextRepresentation)
    assert isinstance(by_shard[unadaptable.shard_id], psycopg.ProgrammingError)
    assert all(getattr(by_shard[c.shard_id], "accepted", False) for c in (good_a, good_b)), by_shard
    async with app.db.connection() as conn:
        cur = await conn.execute("SELECT id, status FROM pgbatch.shards ORDER BY id")
        statuses = dict(await cur.fetchall())
    assert sorted(await _log(app)) == [(good_a.shard_id, 1), (good_b.shard_id, 1)]
    assert statuses[bad.shard_id] == statuses[unadaptable.shard_id] == "running"
    # The good ones ended done with no failed item: their completion deleted them.
    assert good_a.shard_id not in statuses and good_b.shard_id not in statuses


@pytest.mark.asyncio
async def test_in_a_worker_a_failing_statement_retries_only_its_shard(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE copied (n int PRIMARY KEY CHECK (n <> 3))")

    @app.task(max_attempts=2)
    async def insert(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        for item in items:
            ctx.execute_at_commit("INSERT INTO copied (n) VALUES (%(n)s)", {"n": item.value})
        return [pgbatch.ok() for _ in items]

    @app.callback()
    async def note(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        ctx.execute_at_commit("INSERT INTO copied (n) VALUES (%s)", (1000 + batch.id,))

    batch = await app.submit("insert", range(8), shard_size=2, on_complete="note")
    async with running(app):
        done = await app.wait(batch.id, timeout_s=30)

        async def noted() -> bool:
            async with app.db.connection() as conn:
                cur = await conn.execute("SELECT 1 FROM copied WHERE n = %s", (1000 + batch.id,))
                return await cur.fetchone() is not None

        await wait_until(noted, 30)
    # The shard holding 3 fails at commit on both attempts and dies; its neighbours commit.
    assert (done.status, done.shards_dead, done.items_ok, done.items_failed) == (
        "failed", 1, 6, 2,
    )  # fmt: skip
    async with app.db.connection() as conn:
        cur = await conn.execute("SELECT n FROM copied WHERE n < 1000 ORDER BY n")
        assert [row[0] for row in await cur.fetchall()] == [0, 1, 4, 5, 6, 7]
        cur = await conn.execute("SELECT last_error FROM pgbatch.shards WHERE status = 'dead'")
        [(last_error,)] = await cur.fetchall()
    assert "completion failed" in last_error and "copied_n_check" in last_error


# -- the example ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_example_runs_as_a_script_and_copies_twice(database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(REPO_ROOT / "examples" / "collection_copy.py"),
        "--associations", "2000", "--database-url", database_url,
        cwd=REPO_ROOT / "examples",
        env=subprocess_env(database_url),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
    assert process.returncode == 0, output
    assert "2,000 inserted, 0 already present" in output
    assert "0 inserted, 2,000 already present" in output


def test_the_example_app_is_loadable_by_the_worker_command() -> None:
    module = importlib.import_module("examples.collection_copy")
    assert copies.TASK in module.app.tasks
