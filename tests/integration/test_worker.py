"""The worker: retries with backoff, dead shards, timeouts, cancellation, lost leases, wake-ups."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import pgbatch
from pgbatch.db.shards import claim_shards, rescue_expired_leases
from pgbatch.db.verify import verify_batch
from tests.conftest import settings_for
from tests.helpers import wait_until


@asynccontextmanager
async def running(app: pgbatch.App, concurrency: int = 4) -> AsyncIterator[Any]:
    """Run a worker of `app` in this event loop for the duration of the block."""
    worker = app.worker(concurrency=concurrency)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


async def _shards(app: pgbatch.App, batch_id: int) -> list[tuple[Any, ...]]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT status, attempts, last_error FROM pgbatch.shards"
            " WHERE batch_id = %s ORDER BY shard_no",
            (batch_id,),
        )
        return list(await cur.fetchall())


async def _one_result_each(app: pgbatch.App, batch_id: int) -> None:
    async with app.db.connection() as conn:
        check = await verify_batch(conn, batch_id)
    assert check.every_item_has_one_result, check


@pytest.mark.asyncio
async def test_a_failing_handler_is_retried_then_succeeds(app: pgbatch.App) -> None:
    calls: list[int] = []

    @app.task(max_attempts=5)
    async def flaky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise RuntimeError(f"transient {ctx.attempt}")
        return [pgbatch.ok(i.value) for i in items]

    batch = await app.submit("flaky", range(10), shard_size=10)
    async with running(app) as worker:
        done = await app.wait(batch.id, timeout_s=20)
    assert calls == [1, 2, 3]
    assert (done.status, done.items_ok) == ("succeeded", 10)
    # Done with no failed item: the completion deleted the shard (the calls show 3 runs).
    assert await _shards(app, batch.id) == []
    # Both failed attempts were requeued through the completer, like the completion.
    assert worker.stats.shards_retried == 2
    flushed = sum(size * n for size, n in worker.completion_flush_sizes().items())
    assert flushed == 3


@pytest.mark.asyncio
async def test_after_max_attempts_the_shard_is_dead_and_its_items_fail(app: pgbatch.App) -> None:
    ran: list[str] = []

    @app.task(max_attempts=2)
    async def broken(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        raise ValueError("always")

    @app.callback()
    async def report(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        ran.append(str(batch.status))

    batch = await app.submit("broken", range(6), shard_size=3, on_complete="report")
    async with running(app):
        done = await app.wait(batch.id, timeout_s=20)

        async def callback_ran() -> bool:
            return bool(ran)

        await wait_until(callback_ran, 20)
    assert (done.status, done.items_failed, done.shards_dead) == ("failed", 6, 2)
    assert ran == ["failed"]
    errors = [o.error async for _, o in app.results(batch.id)]
    assert all(e and "failed after 2 attempts: ValueError: always" in e for e in errors)
    await _one_result_each(app, batch.id)


@pytest.mark.asyncio
async def test_item_errors_do_not_retry_the_shard(app: pgbatch.App) -> None:
    @app.task()
    async def picky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.error("odd") if i.value % 2 else pgbatch.ok() for i in items]

    batch = await app.submit("picky", range(10), shard_size=10)
    async with running(app):
        done = await app.wait(batch.id, timeout_s=20)
    assert (done.status, done.items_ok, done.items_failed) == ("succeeded", 5, 5)
    assert await _shards(app, batch.id) == [("done", 1, None)]


@pytest.mark.asyncio
async def test_timeouts_and_wrong_outcome_counts_are_failed_attempts(app: pgbatch.App) -> None:
    @app.task(max_attempts=2, timeout_s=0.05)
    async def slow(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        await asyncio.sleep(10)
        return []

    @app.task(max_attempts=1)
    async def short(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok()]

    timed = await app.submit("slow", range(2), shard_size=2)
    miscounted = await app.submit("short", range(3), shard_size=3)
    async with running(app):
        await app.wait(timed.id, timeout_s=20)
        await app.wait(miscounted.id, timeout_s=20)
    [(status, attempts, error)] = await _shards(app, timed.id)
    assert (status, attempts) == ("dead", 2) and "timed out" in error
    [(status, attempts, error)] = await _shards(app, miscounted.id)
    assert status == "dead" and "1 outcomes for 3 items" in error


@pytest.mark.asyncio
async def test_retry_requeues_dead_shards_and_failed_items(app: pgbatch.App) -> None:
    healthy = False

    # Without isolation, the raising shard dies whole: this test is about retrying it.
    @app.task(max_attempts=1, isolate_poison="off")
    async def fragile(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        if not healthy and items[0].value == 0:
            raise RuntimeError("down")
        return [pgbatch.ok() if healthy or i.value != 7 else pgbatch.error("seven") for i in items]

    @app.callback()
    async def cb(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        return None

    batch = await app.submit("fragile", range(12), shard_size=4, on_complete="cb")
    async with running(app):
        first = await app.wait(batch.id, timeout_s=20)
        assert (first.status, first.items_ok, first.items_failed) == ("failed", 7, 5)
        healthy = True
        assert await app.retry(batch.id, expected_version=first.version) == 2
        second = await app.wait(batch.id, timeout_s=20)
    assert (second.status, second.items_ok, second.items_failed, second.run_no) == (
        "succeeded", 12, 0, 2,
    )  # fmt: skip
    await _one_result_each(app, batch.id)
    async with app.db.connection() as conn:
        runs = await (
            await conn.execute("SELECT run_no FROM pgbatch.callbacks ORDER BY run_no")
        ).fetchall()
    assert runs == [(1,), (2,)]
    with pytest.raises(pgbatch.StaleVersionError):
        await app.retry(batch.id, expected_version=first.version)


@pytest.mark.asyncio
async def test_cancel_stops_queued_and_running_shards(database_url: str) -> None:
    # A short lease makes the heartbeat (every TTL/3) notice the cancellation quickly.
    app = pgbatch.App(settings=settings_for(database_url))
    started = asyncio.Event()
    cancelled_seen: list[bool] = []

    @app.task(lease_ttl_s=0.6)
    async def long(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled_seen.append(ctx.cancelled)
            raise
        return []

    @app.callback()
    async def cb(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        return None

    await app.open()
    try:
        batch = await app.submit("long", range(20), shard_size=2, on_complete="cb")
        async with running(app, concurrency=2):
            await asyncio.wait_for(started.wait(), 10)
            assert await app.cancel(batch.id) is True
            done = await app.wait(batch.id, timeout_s=20)
            assert await app.cancel(batch.id) is False  # already ended: nothing changes
        assert done.status == "cancelled" and done.shards_done == 10
        assert cancelled_seen == [True, True]
        statuses = {status for status, _, _ in await _shards(app, batch.id)}
        assert statuses == {"cancelled"}
        await _one_result_each(app, batch.id)
        errors = {o.error async for _, o in app.results(batch.id)}
        assert errors == {"cancelled"}
        async with app.db.connection() as conn:
            check = await verify_batch(conn, batch.id)
        assert check.callbacks_inserted == 1
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_a_handler_that_lost_its_lease_is_told_and_commits_nothing(
    database_url: str,
) -> None:
    app = pgbatch.App(settings=settings_for(database_url))
    lost_seen = asyncio.Event()
    lost_flags: list[bool] = []
    attempts: list[int] = []

    @app.task(lease_ttl_s=0.6)
    async def victim(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                # The worker cancels a handler whose lease was taken over, and says why.
                lost_flags.append(ctx.lost)
                lost_seen.set()
                raise
        return [pgbatch.ok(ctx.attempt) for _ in items]

    await app.open()
    try:
        batch = await app.submit("victim", range(3), shard_size=3)
        async with running(app, concurrency=1) as worker:
            await wait_until(lambda: _running_count(app), 20)
            async with app.db.connection() as conn:
                # Another worker took the shard over: its epoch moved on.
                await conn.execute("UPDATE pgbatch.shards SET lease_epoch = lease_epoch + 1")
            await asyncio.wait_for(lost_seen.wait(), 10)
            async with app.db.connection() as conn:
                # ...and that worker died too: the lease expires and the shard is rescued.
                await conn.execute(
                    "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 s'"
                )
            done = await app.wait(batch.id, timeout_s=20)
            assert worker.stats.leases_lost == 1
        assert attempts == [1, 2] and lost_flags == [True]
        outputs = {o.output async for _, o in app.results(batch.id)}
        assert (done.status, outputs) == ("succeeded", {2})
    finally:
        await app.close()


async def _running_count(app: pgbatch.App) -> int:
    async with app.db.connection() as conn:
        row = await (
            await conn.execute("SELECT count(*) FROM pgbatch.shards WHERE status = 'running'")
        ).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.asyncio
async def test_an_expired_lease_is_rescued_and_a_crash_looping_shard_dies(
    app: pgbatch.App,
) -> None:
    @app.task(name="t", max_attempts=2)
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok() for _ in items]

    crashed_once = await app.submit("t", range(2), shard_size=2)
    crashed_twice = await app.submit("t", range(2), shard_size=2)
    free = app.settings.lease_free_reruns
    async with app.db.connection() as conn:
        # Workers that died holding the shards: once for the first batch, and on each
        # of its attempts (the whole budget, free reruns of expired leases included)
        # for the second.
        for batch, attempts, refunds in ((crashed_once, 1, 0), (crashed_twice, 2 + free, free)):
            await conn.execute(
                "UPDATE pgbatch.shards SET status = 'running', attempts = %s,"
                " lease_refunds = %s, lease_epoch = %s,"
                " lease_expires_at = now() - interval '1 s' WHERE batch_id = %s",
                (attempts, refunds, attempts, batch.id),
            )
    async with running(app):
        first = await app.wait(crashed_once.id, timeout_s=20)
        second = await app.wait(crashed_twice.id, timeout_s=20)
    assert first.status == "succeeded"
    assert second.status == "failed"
    [(status, attempts, error)] = await _shards(app, crashed_twice.id)
    assert (status, attempts) == ("dead", 3 + free) and "lease expired" in error


@pytest.mark.asyncio
async def test_an_idle_worker_wakes_on_notify_not_on_polling(database_url: str) -> None:
    # Polling every 60 s: only a NOTIFY can make the worker start within the deadline.
    app = pgbatch.App(settings=settings_for(database_url, poll_interval_s=60))
    started_at: list[float] = []

    @app.task()
    async def mark(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        started_at.append(time.monotonic())
        return [pgbatch.ok() for _ in items]

    await app.open()
    try:
        async with running(app) as worker:
            await asyncio.wait_for(worker.listening.wait(), 10)
            # Idle: its claim found nothing, so only a NOTIFY can start the next one soon.
            await asyncio.wait_for(worker.queue_empty.wait(), 10)
            for _ in range(3):
                submitted = time.monotonic()
                batch = await app.submit("mark", [1])
                await app.wait(batch.id, timeout_s=5)
                assert started_at[-1] - submitted < 2.0
    finally:
        await app.close()


@pytest.mark.asyncio
async def test_an_unstorable_output_fails_only_its_own_shard(app: pgbatch.App) -> None:
    @app.task(max_attempts=1)
    async def odd(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        # A set is not JSON: only the shard holding item 13 returns one.
        return [pgbatch.ok({1, 2} if i.value == 13 else i.value) for i in items]

    batch = await app.submit("odd", range(40), shard_size=2)
    async with running(app, concurrency=20):
        done = await app.wait(batch.id, timeout_s=20)
    assert (done.status, done.items_ok, done.items_failed, done.shards_dead) == (
        "failed", 38, 2, 1,
    )  # fmt: skip
    dead = [row for row in await _shards(app, batch.id) if row[0] == "dead"]
    assert len(dead) == 1 and "cannot store the handler's output" in dead[0][2]


@pytest.mark.asyncio
async def test_a_rejected_user_row_on_the_last_attempt_kills_the_shard_with_the_reason(
    app: pgbatch.App,
) -> None:
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE positive (v int CHECK (v > 0))")

    @app.task(max_attempts=2)
    async def write(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        ctx.copy_rows("positive", [(i.value,) for i in items], columns=("v",))
        return [pgbatch.ok() for _ in items]

    batch = await app.submit("write", [1, 2, 3, -4, 5, 6], shard_size=3)
    async with running(app):
        done = await app.wait(batch.id, timeout_s=20)
    assert (done.status, done.items_ok, done.items_failed) == ("failed", 3, 3)
    [(_, attempts, error)] = [r for r in await _shards(app, batch.id) if r[0] == "dead"]
    assert attempts == 2 and "completion failed" in error and "positive" in error
    async with app.db.connection() as conn:
        rows = await (await conn.execute("SELECT v FROM positive ORDER BY v")).fetchall()
    assert rows == [(1,), (2,), (3,)]


@pytest.mark.asyncio
async def test_a_rescued_shard_of_a_cancelled_batch_is_not_run_again(app: pgbatch.App) -> None:
    calls: list[int] = []

    @app.task()
    async def count(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        calls.append(ctx.shard_id)
        return [pgbatch.ok() for _ in items]

    batch = await app.submit("count", range(4), shard_size=2)
    async with app.db.connection() as conn:
        # A worker died holding every shard; then the batch was cancelled.
        await conn.execute(
            "UPDATE pgbatch.shards SET status = 'running', attempts = 1, lease_epoch = 1,"
            " lease_expires_at = now() - interval '1 s'"
        )
    assert await app.cancel(batch.id)
    async with running(app):
        done = await app.wait(batch.id, timeout_s=20)
    assert calls == []
    assert (done.status, done.items_failed, done.items_cancelled, done.shards_done) == (
        "cancelled",
        0,
        4,
        2,
    )
    await _one_result_each(app, batch.id)


@pytest.mark.asyncio
async def test_a_failed_attempt_after_a_refunded_lease_is_requeued_not_dead(
    app: pgbatch.App,
) -> None:
    calls: list[int] = []

    @app.task(max_attempts=2)
    async def flaky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        calls.append(ctx.attempt)
        if ctx.attempt == 2:
            raise RuntimeError("boom")
        return [pgbatch.ok() for _ in items]

    batch = await app.submit("flaky", range(3), shard_size=3)
    async with app.db.connection() as conn:
        # Run 1's worker lost the database: the lease lapses and the run is refunded.
        await claim_shards(conn, worker_id="gone", queues=["default"], tasks=["flaky"], limit=1)
        await conn.execute("UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1s'")
        assert (await rescue_expired_leases(conn)).refunded == 1
    async with running(app) as worker:
        done = await app.wait(batch.id, timeout_s=20)
    # Run 2 is the first counted attempt of two: its failure is requeued, run 3 succeeds.
    assert calls == [2, 3]
    assert (done.status, done.items_ok) == ("succeeded", 3)
    assert await _shards(app, batch.id) == []  # done, no failed item: deleted
    assert worker.stats.shards_retried == 1


@pytest.mark.asyncio
async def test_a_non_retryable_error_kills_its_shard_at_once(app: pgbatch.App) -> None:
    runs: list[int] = []

    @app.task(max_attempts=5)
    async def picky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        runs.append(items[0].value)
        if items[0].value == 3:
            raise pgbatch.NonRetryableError("item 3 can never be parsed")
        if items[0].value == 5 and ctx.attempt == 1:
            raise RuntimeError("a passing glitch")  # retried as before
        return [pgbatch.ok(i.value) for i in items]

    batch = await app.submit("picky", range(8), shard_size=1)
    async with running(app, concurrency=4):
        done = await app.wait(batch.id, timeout_s=20)
    assert (done.status, done.items_ok, done.items_failed, done.shards_dead) == ("failed", 7, 1, 1)
    # Only the dead shard keeps its row; the done ones (shard 5 after 2 runs) are deleted.
    [(status, attempts, error)] = await _shards(app, batch.id)
    assert (status, attempts) == ("dead", 1) and "item 3 can never be parsed" in error
    assert runs.count(3) == 1 and runs.count(5) == 2
    [(seq, outcome)] = [r async for r in app.results(batch.id, errors_only=True)]
    assert seq == 3 and "NonRetryableError: item 3 can never be parsed" in (outcome.error or "")
