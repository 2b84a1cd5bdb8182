"""The group completion's plan stays linear in the flush size, whatever plan PostgreSQL picks.

Issue 13: a generic plan of `shard_complete_many`, built on statistics taken when no shard
was running, estimated 10 outcomes and 1 locked shard and joined them in a nested loop:
500 x 500 rows compared per flush of 500 ("Rows Removed by Join Filter: 249500"). psycopg
prepares a statement after five executions on a connection, so the completer gets a
generic plan sooner or later. These tests force it and read the executed plan.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import psycopg
import pytest

import pgbatch
from pgbatch.db.queries import query
from tests.conftest import settings_for
from tests.helpers import register_noop

FLUSH = 500
PARAMS = ("ids", "epochs", "statuses", "errors", "delays_s", "tracebacks", "failed")
PARAM_TYPES = "bigint[], int[], text[], text[], float8[], text[], boolean[]"


def _as_prepared(sql: str) -> str:
    """Return the named query with its %(name)s placeholders as $1..$7, for PREPARE."""
    for number, name in enumerate(PARAMS, start=1):
        sql = sql.replace(f"%({name})s", f"${number}")
    assert "%(" not in sql, "shard_complete_many has a parameter this test does not bind"
    return sql


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _running_flush(app: pgbatch.App, shards: int) -> list[tuple[int, int]]:
    """Submit one-item shards, analyze while none runs, then mark them running (epoch 1)."""
    register_noop(app)
    await app.submit("t", list(range(shards)), shard_size=1)
    async with app.db.connection() as conn:
        # Statistics of a table with no running shard: the state that misled the planner.
        await conn.execute("ANALYZE pgbatch.shards")
        cur = await conn.execute(
            "UPDATE pgbatch.shards SET status = 'running', lease_epoch = 1 "
            "RETURNING id, lease_epoch"
        )
        return sorted(await cur.fetchall())


async def _explain_generic(
    app: pgbatch.App, leases: list[tuple[int, int]], shapes: list[tuple[str, bool]]
) -> dict[str, Any]:
    """Run the completion of `leases` (status, failed) under a forced generic plan.

    Returns the executed plan.
    """
    sql = re.sub(r"^\s*--.*$", "", query("shard_complete_many"), flags=re.M).strip().rstrip(";")
    async with app.db.connection() as conn:
        async with conn.transaction(force_rollback=True):
            await conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            await conn.execute(f"PREPARE complete_plan ({PARAM_TYPES}) AS {_as_prepared(sql)}")
            # Bound on the client: EXPLAIN EXECUTE takes no protocol-level parameters.
            cur = psycopg.AsyncClientCursor(conn)
            await cur.execute(
                "EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE complete_plan "
                "(%s::bigint[], %s::int[], %s::text[], %s::text[], %s::float8[], %s::text[],"
                " %s::boolean[])",
                (
                    [s for s, _ in leases],
                    [e for _, e in leases],
                    [status for status, _ in shapes],
                    [None] * len(leases),
                    [1.0 if status == "queued" else None for status, _ in shapes],
                    [None] * len(leases),
                    [failed for _, failed in shapes],
                ),
            )
            row = await cur.fetchone()
            await conn.execute("DEALLOCATE complete_plan")
    assert row is not None
    doc = row[0] if not isinstance(row[0], str | bytes) else orjson.loads(row[0])
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


def _assert_linear(plan: dict[str, Any]) -> None:
    """Assert the flush was accepted whole with one primary-key probe per outcome."""
    nodes = _nodes(plan)
    # The whole flush is accepted (the plan is the one that ran, not an estimate)...
    assert plan["Actual Rows"] == FLUSH
    # ...and no join compares the flush against itself: the old shape removed 249,500 rows
    # (FLUSH x FLUSH - FLUSH) in a join filter under this very plan.
    removed = max((n.get("Rows Removed by Join Filter", 0) for n in nodes), default=0)
    assert removed < FLUSH, f"a join compared {removed} rows for a flush of {FLUSH}"
    # Every scan of pgbatch.shards is one index probe per outcome, never a scan per outcome.
    scans = [
        n for n in nodes if n.get("Relation Name") == "shards" and n["Node Type"] != "ModifyTable"
    ]
    assert scans
    for node in scans:
        kind = node["Node Type"]
        assert kind in {"Index Scan", "Index Only Scan", "Bitmap Heap Scan"}, kind
        assert node["Actual Loops"] * node.get("Actual Rows", 0) <= FLUSH


@pytest.mark.asyncio
async def test_generic_plan_of_a_flush_compares_no_outcome_with_every_other(
    app: pgbatch.App,
) -> None:
    leases = await _running_flush(app, FLUSH)
    plan = await _explain_generic(app, leases, [("done", True)] * FLUSH)
    _assert_linear(plan)


@pytest.mark.asyncio
async def test_generic_plan_of_a_mixed_flush_deletes_and_updates_by_primary_key(
    app: pgbatch.App,
) -> None:
    """Clean done shards (deleted), done with failures, dead and requeued ones (updated)."""
    leases = await _running_flush(app, FLUSH)
    kinds = [("done", False), ("done", True), ("dead", True), ("queued", False)]
    shapes = [kinds[i % len(kinds)] for i in range(FLUSH)]
    plan = await _explain_generic(app, leases, shapes)
    _assert_linear(plan)
    modified = [n for n in _nodes(plan) if n["Node Type"] == "ModifyTable"]
    assert sorted(n["Operation"] for n in modified) == ["Delete", "Update"]
    rows = {n["Operation"]: n["Actual Rows"] for n in modified}
    assert rows == {"Delete": FLUSH // 4, "Update": FLUSH - FLUSH // 4}


@pytest.mark.asyncio
async def test_generic_plan_of_a_clean_flush_deletes_every_shard(app: pgbatch.App) -> None:
    leases = await _running_flush(app, FLUSH)
    plan = await _explain_generic(app, leases, [("done", False)] * FLUSH)
    _assert_linear(plan)


@pytest.mark.asyncio
async def test_flush_prepared_many_times_still_fences_by_epoch(database_url: str) -> None:
    """Through psycopg's own preparation (after 5 executions), zombies still match nothing."""
    async with pgbatch.App(settings=settings_for(database_url)) as app:
        register_noop(app)
        await app.submit("t", list(range(40)), shard_size=1)
        async with app.db.connection() as conn:
            await conn.execute("ANALYZE pgbatch.shards")
            await conn.execute("SET plan_cache_mode = force_generic_plan")
            for round_no in range(8):  # past psycopg's prepare_threshold (5)
                rows = await (
                    await conn.execute(
                        "UPDATE pgbatch.shards SET status = 'running', "
                        "lease_epoch = lease_epoch + 1 "
                        "WHERE id IN (SELECT id FROM pgbatch.shards WHERE status = 'queued' "
                        "ORDER BY id LIMIT 5) RETURNING id, lease_epoch"
                    )
                ).fetchall()
                leases = sorted(rows)
                # The first shard is offered with a stale epoch: a zombie's completion.
                epochs = [e - 1 if i == 0 else e for i, (_, e) in enumerate(leases)]
                cur = await conn.execute(
                    query("shard_complete_many"),
                    {
                        "ids": [s for s, _ in leases],
                        "epochs": epochs,
                        "statuses": ["done"] * len(leases),
                        "errors": [None] * len(leases),
                        "delays_s": [None] * len(leases),
                        "tracebacks": [None] * len(leases),
                        # Half delete (done, clean), half update (done with failures).
                        "failed": [i % 2 == 0 for i in range(len(leases))],
                    },
                )
                accepted = sorted(row[:2] for row in await cur.fetchall())
                assert accepted == leases[1:], f"round {round_no}"
                await conn.commit()
            prepared = await (
                await conn.execute(
                    "SELECT count(*) FROM pg_prepared_statements WHERE generic_plans > 0"
                )
            ).fetchone()
            assert prepared is not None and prepared[0] >= 1
        async with app.db.connection() as conn:
            stale = await (
                await conn.execute("SELECT count(*) FROM pgbatch.shards WHERE status = 'running'")
            ).fetchone()
        assert stale == (8,)  # each round's zombie stayed running, fenced out
