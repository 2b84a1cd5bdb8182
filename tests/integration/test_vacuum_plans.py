"""The claim path's plans stay proportional to its work after the pruner vacuumed an empty table.

Issue 13: a VACUUM of `pgbatch.shards` right after its last batch was pruned records it as
empty (0 pages, 0 rows). Idle workers keep claiming and rescuing in that window, and a
statement psycopg has prepared (five executions on a connection) may be re-planned there
as a generic plan built for an empty table: seq scans and hash joins over every shard.
That plan stays cached while the next batch fills the table (inserts invalidate no plan),
so each claim, heartbeat and rescue then reads every queued shard: 5,000 of 50,000
one-item shards done in 10 minutes (docs/design/retention.md). These tests vacuum as the
pruner does, run the engine's own claim path in the empty window past psycopg's prepare
threshold, submit a batch, and read the plans the same calls execute (auto_explain).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psycopg
import pytest
import pytest_asyncio

import pgbatch
from pgbatch.db.retention import prune_batches, vacuum_pruned_tables
from pgbatch.db.shards import (
    ShardCompletion,
    claim_shards,
    complete_shards,
    heartbeat_shards,
    rescue_expired_leases,
)
from tests.helpers import register_noop

QUEUED = 20_000
CLAIM_LIMIT = 64
LEASES = 256
# More executions than psycopg's prepare_threshold (5) and PostgreSQL's five custom plans
# before it may settle on a generic one.
WARM_CALLS = 12
# Rows of pgbatch.shards a statement may touch: a few per shard it works on, never one per
# queued shard.
ROWS_PER_SHARD = 4


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


def _shard_rows_read(plan: dict[str, Any]) -> int:
    """Rows the plan's scans of pgbatch.shards returned or filtered out, over all loops."""
    total = 0
    for node in _nodes(plan):
        if node.get("Relation Name") == "shards" and node["Node Type"] != "ModifyTable":
            rows = node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
            total += int(rows * node.get("Actual Loops", 1))
    return total


@pytest_asyncio.fixture
async def explained(app: pgbatch.App) -> AsyncIterator[tuple[psycopg.AsyncConnection[Any], list]]:
    """A pooled connection whose every statement's executed plan is sent back as a notice."""
    plans: list[dict[str, Any]] = []
    async with app.db.connection() as conn:
        try:
            await conn.execute("LOAD 'auto_explain'")
        except psycopg.Error as exc:  # not installed, or not allowed to this role
            pytest.skip(f"auto_explain is not available: {exc}")
        for setting, value in (
            ("auto_explain.log_min_duration", "0"),
            ("auto_explain.log_analyze", "on"),
            ("auto_explain.log_timing", "off"),
            ("auto_explain.log_format", "json"),
            ("auto_explain.log_level", "notice"),
        ):
            await conn.execute("SELECT set_config(%s, %s, false)", (setting, value))

        def collect(diag: psycopg.errors.Diagnostic) -> None:
            text = diag.message_primary or ""
            if "{" in text:
                doc = orjson.loads(text[text.index("{") :])
                plans.append({"text": doc.get("Query Text", ""), "plan": doc["Plan"]})

        conn.add_notice_handler(collect)
        yield conn, plans
        conn.remove_notice_handler(collect)
        await conn.execute("RESET ALL")


async def _claim_path(
    conn: psycopg.AsyncConnection[Any], leases: list[tuple[int, int]], batch_id: int
) -> None:
    await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=CLAIM_LIMIT)
    await heartbeat_shards(conn, leases)
    await rescue_expired_leases(conn)
    # The completion, as a flush of failed attempts sent back (no results to encode). In
    # growth.py PostgreSQL settled on its generic plan (custom ones had cost more, made on
    # full tables); here that is forced: a prepared statement keeps the plan it made in the
    # empty window, an unprepared one is planned again with the table as it is.
    retries = [ShardCompletion.retry(i, batch_id, e, delay_s=0, error="x") for i, e in leases]
    async with conn.transaction():
        await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await complete_shards(conn, retries)


@pytest.mark.asyncio
async def test_claim_path_after_vacuum_of_an_emptied_table_reads_only_its_shards(
    app: pgbatch.App, explained: tuple[psycopg.AsyncConnection[Any], list[dict[str, Any]]]
) -> None:
    conn, plans = explained
    register_noop(app)
    # A first batch ran and was pruned; the pruner's vacuum then found the tables empty.
    await app.submit("t", list(range(2_000)), shard_size=1)
    async with app.db.connection() as other:
        await other.execute("ANALYZE pgbatch.shards")
        for table in ("shards", "item_blocks", "batches"):
            await other.execute(f"DELETE FROM pgbatch.{table}")
        assert "shards" in await vacuum_pruned_tables(other, interval_s=0, lock_timeout_ms=1000)
    # Idle workers in the empty window: claims find nothing, a heartbeat of a shard of
    # another batch, rescues every second.
    for _ in range(WARM_CALLS):
        await _claim_path(conn, [(10**9, 1)], 10**9)
    # The next batch: many queued, some running under a live lease.
    await app.submit("t", list(range(QUEUED)), shard_size=1)
    async with app.db.connection() as other:
        running = await claim_shards(
            other, worker_id="w2", queues=["default"], tasks=["t"], limit=LEASES
        )
    leases = [(s.id, s.lease_epoch) for s in running]
    assert len(leases) == LEASES
    plans.clear()
    await _claim_path(conn, leases, running[0].batch_id)
    read = {p["text"].split("\n", 1)[0][:60]: _shard_rows_read(p["plan"]) for p in plans}
    assert len(plans) >= 4, read
    for statement, rows in read.items():
        assert rows <= ROWS_PER_SHARD * LEASES + 100, (
            f"{statement!r} read {rows} rows of pgbatch.shards ({QUEUED} queued): {read}"
        )


# The pruner's own statements, run in the same window: its VACUUM records the tables empty,
# and it goes on pruning small batches (one-item waits, callbacks' batches) meanwhile.
PRUNE_WARM_PASSES = 14  # psycopg prepares on the 6th execution; PostgreSQL may go generic 5 later
PRUNE_QUEUED = 5_000


async def _finished_small_batch(app: pgbatch.App) -> None:
    batch = await app.submit("t", [0], shard_size=1)
    async with app.db.connection() as other:
        await other.execute(
            "UPDATE pgbatch.shards SET status = 'done', finished_at = now() WHERE batch_id = %s",
            (batch.id,),
        )
        await other.execute(
            "UPDATE pgbatch.batches SET status = 'succeeded', finished_at = now(),"
            " shards_done = total_shards, items_ok = total_items WHERE id = %s",
            (batch.id,),
        )


@pytest.mark.asyncio
async def test_pruning_after_its_vacuum_of_an_emptied_table_reads_only_the_pruned_rows(
    app: pgbatch.App, explained: tuple[psycopg.AsyncConnection[Any], list[dict[str, Any]]]
) -> None:
    conn, plans = explained
    register_noop(app)
    await app.submit("t", list(range(2_000)), shard_size=1)
    async with app.db.connection() as other:
        await other.execute("ANALYZE pgbatch.shards")
        for table in ("shards", "item_blocks", "batches"):
            await other.execute(f"DELETE FROM pgbatch.{table}")
        assert "shards" in await vacuum_pruned_tables(other, interval_s=0, lock_timeout_ms=1000)
    soon = datetime.now(UTC) + timedelta(hours=1)
    # As if PostgreSQL settled on generic plans (it does once custom ones cost more, as
    # they did in benchmarks/growth.py with full tables between the empty windows): a
    # prepared statement keeps the one it built in the empty window; an unprepared one
    # is planned again at each execution, with the table as it is then.
    await conn.execute("SET plan_cache_mode = force_generic_plan")
    for _ in range(PRUNE_WARM_PASSES):
        await _finished_small_batch(app)
        report = await prune_batches(conn, finished_before=soon, limit=1)
        assert len(report.cleaned) == 1
    # The next batch fills the table; a small one finishes and is pruned next to it.
    await app.submit("t", list(range(PRUNE_QUEUED)), shard_size=1)
    await _finished_small_batch(app)
    plans.clear()
    report = await prune_batches(conn, finished_before=soon, limit=1)
    assert len(report.cleaned) == 1
    read = {p["text"].split("\n", 1)[0][:60]: _shard_rows_read(p["plan"]) for p in plans}
    assert len(read) >= 4, read
    # At most one pass over the table: the column statistics (one batch filled the table
    # when they were taken) may make a seq scan the cheapest way to find a batch's shards,
    # but no statement may read the table once per row (the generic plan did: minutes).
    for statement, rows in read.items():
        assert rows <= PRUNE_QUEUED + 100, f"{statement!r} read {rows} rows of shards: {read}"
