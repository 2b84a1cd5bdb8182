"""Issue 12: a shard's poison items fail alone, with their own error and traceback; the
others succeed, with the handler's writes for them committed exactly once, fenced."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from tests.conftest import settings_for
from tests.helpers import fetch_all, fetch_one, wait_until

SIDE_TABLES = """
CREATE TABLE IF NOT EXISTS public.side_rows (seq bigint NOT NULL, attempt int NOT NULL);
CREATE TABLE IF NOT EXISTS public.side_statements (seq bigint NOT NULL);
"""


def _app(database_url: str, poison: set[int], *, non_retryable: bool, max_attempts: int) -> Any:
    app = pgbatch.App(settings=settings_for(database_url))
    calls: list[int] = []

    @app.on_open
    async def tables(app: pgbatch.App) -> None:
        async with app.db.connection() as conn:
            await conn.execute(SIDE_TABLES)

    @app.task("picky", shard_size=100, max_attempts=max_attempts)
    async def picky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        calls.append(len(items))
        # Writes first, raise after: a failed run's writes must be dropped, not committed.
        ctx.copy_rows(
            "public.side_rows", [(i.seq, ctx.attempt) for i in items], columns=["seq", "attempt"]
        )
        ctx.execute_at_commit(
            "INSERT INTO public.side_statements (seq) SELECT unnest(%s::bigint[])",
            [[i.seq for i in items]],
        )
        for item in items:
            if item.value in poison:
                record: dict[str, Any] = {}
                if non_retryable:
                    raise pgbatch.NonRetryableError(f"item {item.value} is <b>[red]bad[/red]</b>")
                return record["prompt"]  # KeyError: 'prompt', a deterministic bug
        return [pgbatch.ok(item.value * 2) for item in items]

    return app, calls


async def _check_side_writes(
    database_url: str, good: set[int], tables: tuple[str, ...] = ("side_rows", "side_statements")
) -> None:
    for table in tables:
        rows = await fetch_all(
            database_url, f"SELECT seq, count(*) FROM public.{table} GROUP BY seq ORDER BY seq"
        )
        # Present exactly once for every good item, absent for every poison one.
        assert rows == [(seq, 1) for seq in sorted(good)], table


@pytest.mark.asyncio
@pytest.mark.parametrize("poison", [{41}, {3, 50, 97}])
async def test_non_retryable_poison_items_fail_alone_and_the_others_succeed_once(
    database_url: str, poison: set[int]
) -> None:
    app, calls = _app(database_url, poison, non_retryable=True, max_attempts=5)
    await app.open()
    try:
        batch = await app.submit("picky", range(100))
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            done = await app.wait(batch.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        assert (done.status, done.items_ok, done.items_failed) == (
            "succeeded",
            100 - len(poison),
            len(poison),
        )
        assert done.shards_dead == 0
        assert worker.stats.poison_items == len(poison)
        # Bisection, not a run per item: far fewer calls than items.
        assert len(calls) - 1 == worker.stats.isolation_runs < 100
        failed = [(seq, o) async for seq, o in app.results(batch.id, errors_only=True)]
        assert [seq for seq, _ in failed] == sorted(poison)
        for seq, outcome in failed:
            # Each has its own error and traceback, the markup kept as text.
            assert outcome.error == (
                f"not retried (attempt 1): NonRetryableError: item {seq} is <b>[red]bad[/red]</b>"
            )
            assert outcome.traceback is not None
            assert "in picky" in outcome.traceback
            assert f"item {seq} is <b>[red]bad[/red]</b>" in outcome.traceback
        oks = [o async for _, o in app.results(batch.id) if o.ok]
        assert sorted(o.output for o in oks) == [2 * v for v in range(100) if v not in poison]
        await _check_side_writes(database_url, set(range(100)) - poison)
        async with app.db.connection() as conn:
            check = await verify_batch(conn, batch.id)
        assert check.every_item_has_one_result, check
        status, error, traceback = await fetch_one(
            database_url,
            "SELECT status, last_error, last_traceback FROM pgbatch.shards WHERE batch_id = %s",
            (batch.id,),
        )
        assert status == "done"
        assert error.startswith(f"{len(poison)} of 100 items failed alone")
        assert "NonRetryableError" in traceback
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_an_ordinary_exception_retries_the_shard_then_isolates_on_its_last_attempt(
    database_url: str,
) -> None:
    poison = {3, 50, 97}
    app, calls = _app(database_url, poison, non_retryable=False, max_attempts=2)
    await app.open()
    try:
        batch = await app.submit("picky", range(100))
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            done = await app.wait(batch.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        assert (done.status, done.items_ok, done.items_failed) == ("succeeded", 97, 3)
        # Attempt 1 ran the shard whole and was retried as before; attempt 2 bisected it.
        assert calls[:2] == [100, 100] and len(calls) > 2
        assert worker.stats.shards_retried == 1
        failed = [(seq, o) async for seq, o in app.results(batch.id, errors_only=True)]
        assert [seq for seq, _ in failed] == [3, 50, 97]
        for _, outcome in failed:
            assert outcome.error == "failed after 2 attempts: KeyError: 'prompt'"
            assert outcome.traceback is not None and "KeyError: 'prompt'" in outcome.traceback
            # Its own run's traceback, not chained to the run of the whole shard.
            assert "During handling" not in outcome.traceback
        # Only the last attempt's good runs wrote: attempt 1's writes were discarded.
        await _check_side_writes(database_url, set(range(100)) - poison)
        assert await fetch_all(database_url, "SELECT DISTINCT attempt FROM public.side_rows") == [
            (2,)
        ]
        # The three share one traceback text (same line, same message): stored once.
        [(count,)] = await fetch_all(
            database_url, "SELECT count(*) FROM pgbatch.tracebacks WHERE batch_id = %s", (batch.id,)
        )
        assert count == 1
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_a_lease_lost_during_isolation_writes_nothing(database_url: str) -> None:
    app = pgbatch.App(settings=settings_for(database_url))
    stolen = asyncio.Event()

    @app.on_open
    async def tables(app: pgbatch.App) -> None:
        async with app.db.connection() as conn:
            await conn.execute(SIDE_TABLES)

    @app.task("steal", shard_size=100, max_attempts=1)
    async def steal(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        ctx.copy_rows(
            "public.side_rows", [(i.seq, ctx.attempt) for i in items], columns=["seq", "attempt"]
        )
        if len(items) < 100 and not stolen.is_set():
            # Another worker takes the shard over while this one is bisecting it.
            async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
                await c.execute(
                    "UPDATE pgbatch.shards SET lease_epoch = lease_epoch + 1 WHERE id = %s",
                    (ctx.shard_id,),
                )
            stolen.set()
        if any(i.value == 7 for i in items):
            raise pgbatch.NonRetryableError("seven")
        return [pgbatch.ok(i.value) for i in items]

    await app.open()
    try:
        batch = await app.submit("steal", range(100))
        worker = app.worker(concurrency=1)
        running = asyncio.create_task(worker.run())
        try:
            await wait_until(
                lambda: (
                    stolen.is_set()
                    and worker.stats.shards_fenced_out + worker.stats.leases_lost >= 1
                    and not worker._active
                ),
                30,
                message=lambda: f"worker stats: {worker.stats}",
            )
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        assert await fetch_all(
            database_url, "SELECT count(*) FROM pgbatch.results WHERE batch_id = %s", (batch.id,)
        ) == [(0,)]
        assert await fetch_all(database_url, "SELECT count(*) FROM public.side_rows") == [(0,)]
        assert await fetch_all(
            database_url, "SELECT count(*) FROM pgbatch.tracebacks WHERE batch_id = %s", (batch.id,)
        ) == [(0,)]
        current = await app.get_batch(batch.id)
        assert (current.items_ok, current.items_failed, current.shards_done) == (0, 0, 0)
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_an_ordinary_item_failure_found_while_isolating_retries_the_shard_whole(
    database_url: str,
) -> None:
    app = pgbatch.App(settings=settings_for(database_url))

    @app.on_open
    async def tables(app: pgbatch.App) -> None:
        async with app.db.connection() as conn:
            await conn.execute(SIDE_TABLES)

    @app.task("mixed", shard_size=100, max_attempts=3)
    async def mixed(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        ctx.copy_rows(
            "public.side_rows", [(i.seq, ctx.attempt) for i in items], columns=["seq", "attempt"]
        )
        values = {i.value for i in items}
        if 10 in values:
            raise pgbatch.NonRetryableError("ten never parses")
        if 60 in values and ctx.attempt == 1:
            raise RuntimeError("a passing glitch")  # may be transient: worth a retry
        # An error the handler returns is not a poison item: it stays as it was said.
        return [pgbatch.error("thirty") if i.value == 30 else pgbatch.ok(i.value) for i in items]

    await app.open()
    try:
        batch = await app.submit("mixed", range(100))
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            done = await app.wait(batch.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        # Attempt 1 found item 60's glitch while isolating: the shard was retried whole;
        # attempt 2 isolated item 10 alone.
        assert (done.status, done.items_ok, done.items_failed) == ("succeeded", 98, 2)
        assert worker.stats.shards_retried == 1
        failed = [(seq, o.error) async for seq, o in app.results(batch.id, errors_only=True)]
        assert failed == [
            (10, "not retried (attempt 2): NonRetryableError: ten never parses"),
            (30, "thirty"),
        ]
        await _check_side_writes(database_url, set(range(100)) - {10}, ("side_rows",))
        assert await fetch_all(database_url, "SELECT DISTINCT attempt FROM public.side_rows") == [
            (2,)
        ]
    finally:
        await app.close()
