"""Retention (issue 13): finished batches are pruned, never one that is not final, no orphans."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.queries import query
from pgbatch.db.retention import PruneReport, _detach, prune_batches
from pgbatch.errors import BatchNotFoundError, BatchPrunedError
from tests.conftest import settings_for
from tests.helpers import register_noop, wait_until

# The per-batch tables are found in the catalog (every pgbatch table with a batch_id
# column), so a table a later migration or workload adds is checked for orphans too.
BATCH_TABLES_SQL = """
SELECT table_name FROM information_schema.columns
WHERE table_schema = 'pgbatch' AND column_name = 'batch_id'
ORDER BY table_name
"""


@asynccontextmanager
async def running(app: pgbatch.App, concurrency: int = 8) -> AsyncIterator[Any]:
    """Run a worker of `app` in this event loop for the duration of the block."""
    worker = app.worker(concurrency=concurrency)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)


def _register(app: pgbatch.App) -> None:
    register_noop(app)

    @app.task(name="half")  # odd items fail: a batch that can be retried
    async def half(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(i.seq) if i.seq % 2 == 0 else pgbatch.error("odd") for i in items]

    @app.task(name="slow")  # holds its shards until released: a batch kept running
    async def slow(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        await GATE["release"].wait()
        return [pgbatch.ok() for _ in items]


# The event that releases the "slow" task; each test that uses it makes a new one in its
# own event loop (an asyncio.Event belongs to the loop that first waits on it).
GATE: dict[str, asyncio.Event] = {}


async def _orphans(app: pgbatch.App) -> dict[str, int]:
    """Count rows of every per-batch table whose batch row is gone, by table."""
    found = {}
    async with app.db.connection() as conn:
        tables = [row[0] for row in await (await conn.execute(BATCH_TABLES_SQL)).fetchall()]
        assert {"items", "shards", "results", "callbacks"} <= set(tables)
        for table in tables:
            cur = await conn.execute(
                f"SELECT count(*) FROM pgbatch.{table} t WHERE NOT EXISTS "
                "(SELECT 1 FROM pgbatch.batches b WHERE b.id = t.batch_id)"
            )
            row = await cur.fetchone()
            found[table] = int(row[0]) if row else 0
    return {t: n for t, n in found.items() if n}


async def _rows_of(app: pgbatch.App, batch_id: int) -> dict[str, int]:
    async with app.db.connection() as conn:
        counts = {}
        for table in ("items", "shards", "results", "callbacks"):
            cur = await conn.execute(
                f"SELECT count(*) FROM pgbatch.{table} WHERE batch_id = %s",
                (batch_id,),
            )
            row = await cur.fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts


async def _stored_rows_of(app: pgbatch.App, batch_id: int) -> dict[str, int]:
    """Count the rows a batch has on disk: items and results as blocks (0009), not per item."""
    async with app.db.connection() as conn:
        counts = {}
        for table in ("item_blocks", "shards", "result_blocks", "result_errors", "callbacks"):
            cur = await conn.execute(
                f"SELECT count(*) FROM pgbatch.{table} WHERE batch_id = %s",
                (batch_id,),
            )
            row = await cur.fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts


async def _intact(app: pgbatch.App, batch: pgbatch.Batch) -> None:
    """Assert a batch that was not pruned still has every row it had."""
    rows = await _rows_of(app, batch.id)
    assert rows["items"] == batch.total_items, (batch.id, rows)
    # A shard done with no failed item has no row (its completion deleted it); every one
    # not yet counted is there. Counted after the rows were: the bound only loosens.
    now = await app.get_batch(batch.id)
    assert now.total_shards - now.shards_done <= rows["shards"] <= now.total_shards, (now, rows)
    if batch.is_final:
        assert rows["results"] == batch.total_items, (batch.id, rows)


@pytest.mark.asyncio
async def test_a_finished_batch_past_its_retention_is_removed_and_answers_pruned(
    app: pgbatch.App,
) -> None:
    _register(app)
    expired = await app.submit("t", range(30), shard_size=7, retention_s=0, on_complete="cb")
    kept = await app.submit("t", range(5), shard_size=2, retention_s=None)
    default = await app.submit("t", range(5), shard_size=2)  # the 7-day default
    async with running(app):
        for batch in (expired, kept, default):
            await app.wait(batch.id, timeout_s=30)
        await wait_until(lambda: _callbacks_done(app, expired.id), 10)
    still_running = await app.submit("t", range(4), shard_size=1, retention_s=0)
    metrics_before = await app.metrics_snapshot()

    report = await app.prune()

    assert report.pruned == [expired.id] and report.cleaned == [expired.id]
    assert await _rows_of(app, expired.id) == dict.fromkeys(
        ("items", "shards", "results", "callbacks"), 0
    )
    assert await _orphans(app) == {}
    for batch in (kept, default):
        await _intact(app, await app.get_batch(batch.id))
    await _intact(app, await app.get_batch(still_running.id))
    with pytest.raises(BatchPrunedError) as pruned:
        await app.get_batch(expired.id)
    assert pruned.value.pruned_at is not None and "pruned at" in str(pruned.value)
    with pytest.raises(BatchPrunedError):
        await app.retry(expired.id)
    with pytest.raises(BatchPrunedError):
        [r async for r in app.results(expired.id)]
    # Tenant-scoped like the batch: another tenant's view is a plain "not found".
    with pytest.raises(BatchNotFoundError) as foreign:
        await app.get_batch(expired.id, tenant="someone-else")
    assert not isinstance(foreign.value, BatchPrunedError)
    # The metrics' totals do not go down with the batch; the prune is counted.
    metrics = await app.metrics_snapshot()
    assert (metrics.items_ok, metrics.shards_done) == (
        metrics_before.items_ok,
        metrics_before.shards_done,
    )
    assert (metrics_before.batches_pruned, metrics.batches_pruned) == (0, 1)
    assert {"items", "shards", "results", "batches"} <= set(metrics.table_bytes)
    # Pruning again finds nothing to do.
    again = await app.prune()
    assert again.pruned == [] and again.cleaned == []


async def _callbacks_done(app: pgbatch.App, batch_id: int) -> bool:
    async with app.db.connection() as conn:
        row = await (
            await conn.execute(
                "SELECT count(*) FILTER (WHERE status IN ('done', 'dead')) = count(*)"
                " AND count(*) > 0 FROM pgbatch.callbacks WHERE batch_id = %s",
                (batch_id,),
            )
        ).fetchone()
    return bool(row and row[0])


@pytest.mark.asyncio
async def test_finished_before_prunes_batches_kept_forever_and_old_ones(app: pgbatch.App) -> None:
    _register(app)
    kept = await app.submit("t", range(3), retention_s=None)
    async with running(app):
        await app.wait(kept.id, timeout_s=30)
    assert (await app.prune()).pruned == []
    assert await app.due_for_pruning(finished_before=datetime.now(UTC)) != []
    report = await app.prune(finished_before=datetime.now(UTC) + timedelta(seconds=1))
    assert report.pruned == [kept.id]


@pytest.mark.asyncio
async def test_a_huge_batch_goes_in_bounded_chunks_and_a_half_done_prune_is_finished(
    database_url: str,
) -> None:
    settings = settings_for(database_url, retention_chunk_rows=7)
    async with pgbatch.App(settings=settings) as app:
        _register(app)
        batch = await app.submit("t", range(100), shard_size=3, retention_s=0)
        async with running(app):
            await app.wait(batch.id, timeout_s=30)
        async with app.db.connection() as conn:
            # A pruner that stopped after its first chunk: detached, one range deleted.
            assert await _detach(conn, batch.id, finished_before=None, now=None,
                                 lock_timeout_ms=50)  # fmt: skip
            await conn.execute(
                query("retention_clean_range"), {"batch_id": batch.id, "lo": 0, "hi": 7}
            )
        with pytest.raises(BatchPrunedError):
            await app.get_batch(batch.id)
        left = await _stored_rows_of(app, batch.id)
        # 34 shards, 34 item blocks, 34 result blocks (no failures), less the first range.
        assert 0 < sum(left.values()) < 3 * 34
        # The next pass (any process) finishes it, chunk by chunk.
        report = await app.prune()
        assert report.cleaned == [batch.id] and report.pruned == []
        assert report.rows_deleted == sum(left.values())
        assert await _orphans(app) == {}


@pytest.mark.asyncio
async def test_a_locked_batch_is_skipped_at_once_and_pruned_on_a_later_pass(
    app: pgbatch.App,
) -> None:
    _register(app)
    batch = await app.submit("t", range(4), retention_s=0)
    async with running(app):
        await app.wait(batch.id, timeout_s=30)
    async with await psycopg.AsyncConnection.connect(app.db.url) as holder:
        await holder.execute(
            "SELECT 1 FROM pgbatch.batches WHERE id = %s FOR KEY SHARE", (batch.id,)
        )
        report = await app.prune()  # waits lock_timeout (50 ms), not the 2 s session timeout
        assert report.busy == [batch.id] and report.pruned == []
        await holder.rollback()
    assert (await app.prune()).pruned == [batch.id]


@pytest.mark.asyncio
async def test_several_pruners_at_once_remove_each_batch_once_without_error(
    database_url: str,
) -> None:
    settings = settings_for(database_url, retention_chunk_rows=5)
    async with pgbatch.App(settings=settings) as app:
        _register(app)
        batches = [await app.submit("t", range(20), shard_size=2, retention_s=0) for _ in range(12)]
        async with running(app):
            for batch in batches:
                await app.wait(batch.id, timeout_s=30)
        pruners = 4
        barrier = asyncio.Barrier(pruners)

        async def pruner() -> PruneReport:
            async with app.db.connection() as conn:
                await barrier.wait()  # all start together, each on its own connection
                return await prune_batches(conn, limit=100, chunk_rows=5, lock_timeout_ms=2000)

        reports = await asyncio.gather(*(pruner() for _ in range(pruners)))
    pruned = [b for r in reports for b in r.pruned]
    assert sorted(pruned) == sorted(b.id for b in batches)  # each exactly once
    assert all(not r.busy for r in reports)  # no deadlock, no lock given up
    async with pgbatch.App(settings=settings) as app:
        report = await app.prune()  # whatever a pruner left to another one is finished
        async with app.db.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*), count(*) FILTER (WHERE cleaned_at IS NULL)"
                    " FROM pgbatch.pruned_batches"
                )
            ).fetchone()
        assert row == (12, 0), report
        assert await _orphans(app) == {}


@pytest.mark.asyncio
async def test_prune_racing_running_batches_submits_retries_and_streams(
    database_url: str,
) -> None:
    # No automatic pruning here: this test counts every prune it makes.
    settings = settings_for(database_url, retention_chunk_rows=50, retention_interval_s=3600)
    GATE["release"] = asyncio.Event()
    async with pgbatch.App(settings=settings) as app:
        _register(app)
        held = await app.submit("slow", range(6), shard_size=1, retention_s=0)
        failing = [
            await app.submit("half", range(10), shard_size=2, retention_s=0) for _ in range(4)
        ]
        streamed = await app.submit("t", range(25_000), shard_size=5_000, retention_s=0)
        async with running(app, concurrency=8):
            for batch in (*failing, streamed):
                await app.wait(batch.id, timeout_s=60)
            submitted: list[pgbatch.Batch] = []
            stop = asyncio.Event()
            start = asyncio.Barrier(4)

            async def submitter() -> None:
                await start.wait()
                while not stop.is_set() and len(submitted) < 40:
                    submitted.append(await app.submit("t", range(5), shard_size=1, retention_s=0))

            async def retrier() -> list[str]:
                await start.wait()
                seen = []
                for batch in failing:
                    try:
                        seen.append(f"requeued {await app.retry(batch.id)}")
                    except BatchPrunedError:
                        seen.append("pruned")
                return seen

            async def streamer() -> str:
                await start.wait()
                rows = 0
                try:
                    async for _ in app.results(streamed.id):
                        rows += 1
                except BatchPrunedError:
                    return f"error after {rows}"
                assert rows == 25_000  # a stream that ends without error is whole
                return "whole"

            async def pruner() -> list[PruneReport]:
                await start.wait()
                reports = []
                for _ in range(10):
                    reports.append(await app.prune(limit=100))
                    await asyncio.sleep(0.02)
                stop.set()
                return reports

            _, retries, stream, reports = await asyncio.gather(
                submitter(), retrier(), streamer(), pruner()
            )
            held_now = await app.get_batch(held.id)  # never pruned while its shards run
            assert not held_now.is_final
            await _intact(app, held_now)
            GATE["release"].set()
            await app.wait(held.id, timeout_s=30)
            for batch in [*failing, *submitted]:
                try:
                    await app.wait(batch.id, timeout_s=30)
                except BatchPrunedError:
                    pass
        assert stream == "whole" or stream.startswith("error after")
        assert retries and all(r == "pruned" or r.startswith("requeued") for r in retries)
        pruned = {b for r in reports for b in r.pruned}
        assert held.id not in pruned
        # Whatever still exists is whole; whatever was pruned left nothing behind.
        for batch in [held, *failing, streamed, *submitted]:
            try:
                await _intact(app, await app.get_batch(batch.id))
            except BatchPrunedError:
                assert batch.id in pruned
        final = await app.prune(limit=1000)
        assert held.id in final.pruned  # final now, and past its retention
        assert await _orphans(app) == {}
        async with app.db.connection() as conn:
            row = await (
                await conn.execute(
                    "SELECT count(*) FROM pgbatch.pruned_batches p"
                    " WHERE p.status NOT IN ('succeeded', 'failed', 'cancelled')"
                )
            ).fetchone()
        assert row == (0,)


@pytest.mark.asyncio
async def test_a_results_stream_broken_by_a_prune_ends_with_an_error(app: pgbatch.App) -> None:
    _register(app)
    batch = await app.submit("t", range(25_000), shard_size=5_000, retention_s=0)
    async with running(app):
        await app.wait(batch.id, timeout_s=60)
    rows = app.results(batch.id)
    first = [await anext(rows) for _ in range(10_001)]  # into the second page
    assert len(first) == 10_001
    assert (await app.prune()).pruned == [batch.id]
    with pytest.raises(BatchPrunedError):
        async for _ in rows:
            pass


@pytest.mark.asyncio
async def test_workers_prune_on_their_own_one_process_at_a_time(database_url: str) -> None:
    settings = settings_for(database_url, retention_interval_s=0.05)
    async with pgbatch.App(settings=settings) as app:
        _register(app)
        batches = [await app.submit("t", range(3), retention_s=0) for _ in range(5)]
        async with running(app) as first, running(app) as second:
            for batch in batches:
                try:
                    await app.wait(batch.id, timeout_s=30)
                except BatchPrunedError:
                    pass

            async def all_pruned() -> bool:
                return first.stats.batches_pruned + second.stats.batches_pruned == 5

            await wait_until(all_pruned, 30)
        assert await _orphans(app) == {}


@pytest.mark.asyncio
async def test_a_pruned_copy_takes_its_workload_rows_with_it(app: pgbatch.App) -> None:
    from pgbatch.workloads import collections as copies

    copies.install(app)
    await copies.create_tables(app)
    for name in ("src", "dst"):
        assert await copies.create_collection(app, name)
    assert await copies.seed_items(app, "src", 50) == 50
    async with running(app):
        batch = await copies.submit_copy(app, source="src", target="dst", item_ids=None,
                                         keys_per_item=10)  # fmt: skip
        await app.wait(batch.id, timeout_s=30)
    async with app.db.connection() as conn:
        stats = "SELECT count(*) FROM pgbatch.collection_copy_stats WHERE batch_id = %s"
        before = await (await conn.execute(stats, (batch.id,))).fetchone()
        assert before is not None and before[0] > 0
        report = await prune_batches(
            conn, finished_before=datetime.now(UTC) + timedelta(seconds=1), chunk_rows=2,
            hooks=[w.prune_rows for w in app.workloads if w.prune_rows is not None],
        )  # fmt: skip
        assert report.cleaned == [batch.id]
        assert await (await conn.execute(stats, (batch.id,))).fetchone() == (0,)
    assert await _orphans(app) == {}
    assert len(await _keys_in(app, "dst")) == 50  # the copied rows are the user's: kept


async def _keys_in(app: pgbatch.App, collection: str) -> set[str]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT item_id FROM pgbatch.collection_items WHERE collection_id = %s", (collection,)
        )
        return {row[0] for row in await cur.fetchall()}


@pytest.mark.asyncio
async def test_a_retry_and_a_prune_at_once_end_one_way_or_the_other(app: pgbatch.App) -> None:
    _register(app)
    outcomes = set()
    for _ in range(6):
        batch = await app.submit("half", range(6), shard_size=2, retention_s=0)
        async with running(app):
            await app.wait(batch.id, timeout_s=30)
            barrier = asyncio.Barrier(2)

            async def retry(
                batch_id: int = batch.id, gate: asyncio.Barrier = barrier
            ) -> int | None:
                await gate.wait()
                try:
                    return await app.retry(batch_id)
                except BatchPrunedError:
                    return None

            async def prune(gate: asyncio.Barrier = barrier) -> PruneReport:
                await gate.wait()
                return await app.prune()

            requeued, report = await asyncio.gather(retry(), prune())
            if requeued is None:  # the prune won: the batch is gone, whole
                assert batch.id in report.pruned
                assert await _rows_of(app, batch.id) == dict.fromkeys(
                    ("items", "shards", "results", "callbacks"), 0
                )
                outcomes.add("pruned")
            elif batch.id in report.pruned:
                # The retry won, the live worker reran its 3 shards at once, and the same
                # prune pass then found the batch final again (retention 0): pruned after
                # its rerun ended, never while it ran.
                assert requeued == 3
                async with app.db.connection() as conn:
                    cur = await conn.execute(
                        "SELECT status FROM pgbatch.pruned_batches WHERE id = %s", (batch.id,)
                    )
                    assert await cur.fetchone() == ("failed",)  # the odd items failed again
                assert await _rows_of(app, batch.id) == dict.fromkeys(
                    ("items", "shards", "results", "callbacks"), 0
                )
                outcomes.add("retried, then pruned")
            else:  # the retry won: the reopened batch was not touched, and reruns
                assert requeued == 3
                rerun = await app.wait(batch.id, timeout_s=30)
                await _intact(app, rerun)
                assert rerun.items_failed == 3  # the odd items fail again
                outcomes.add("retried")
    assert await _orphans(app) == {}
    print("retry/prune outcomes:", outcomes)  # which side wins is the scheduler's choice
    assert outcomes


@pytest.mark.asyncio
async def test_a_cancelled_batch_whose_shards_still_run_is_not_pruned(app: pgbatch.App) -> None:
    _register(app)
    GATE["release"] = asyncio.Event()
    batch = await app.submit("slow", range(4), shard_size=1, retention_s=0)
    async with running(app, concurrency=2):

        async def two_running() -> bool:
            return (await app.get_batch(batch.id)).status == "running"

        await wait_until(two_running, 30)
        assert await app.cancel(batch.id)
        cancelled = await app.get_batch(batch.id)
        assert cancelled.status == "cancelled" and not cancelled.is_final
        assert (await app.prune()).pruned == []  # still ending: two shards run
        await _intact(app, cancelled)
        GATE["release"].set()
        await app.wait(batch.id, timeout_s=30)
    assert (await app.prune()).pruned == [batch.id]  # final now
    assert await _orphans(app) == {}


@pytest.mark.asyncio
async def test_a_pruned_batch_leaves_no_traceback_and_no_llm_usage_behind(
    app: pgbatch.App,
) -> None:
    """Rows that later tables keep per batch (tracebacks, per-request LLM usage) go too."""
    from pgbatch.workloads import llm

    app.use(llm.WORKLOAD)
    await app.migrate()
    register_noop(app)

    @app.task(name="raises", max_attempts=1, isolate_poison="off")
    async def raises(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        raise pgbatch.NonRetryableError(f"bad shard {items[0].seq}")

    failed = await app.submit("raises", range(40), shard_size=4, retention_s=0)
    async with running(app):
        await app.wait(failed.id, timeout_s=30)
    async with app.db.connection() as conn:
        traces = await (
            await conn.execute(
                "SELECT count(*) FROM pgbatch.tracebacks WHERE batch_id = %s", (failed.id,)
            )
        ).fetchone()
        # What the LLM task writes per request, 25,000 rows: more than one chunk of 10,000.
        await conn.execute(
            "INSERT INTO pgbatch.llm_request_usage (batch_id, seq, model, attempts,"
            " prompt_tokens, completion_tokens, cached_tokens, cache_hit)"
            " SELECT %s, g, 'm', 1, 1, 1, 0, false FROM generate_series(0, 24999) g",
            (failed.id,),
        )
    assert traces is not None and traces[0] == 10

    report = await app.prune()

    assert report.cleaned == [failed.id]
    assert await _orphans(app) == {}
