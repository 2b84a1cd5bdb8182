"""The claim's plan stays linear in the shards it claims, whatever plan PostgreSQL picks.

Issue 13: with statistics taken before a batch's shards existed, the fair claim read each
tenant's shards from the wrong index (every queued shard of the tenant, sorted to keep
256); with fresh statistics its generic plan hash-joined the picked shards to a
sequential scan of the whole shard table, and its custom plan one of every item block.
Either made a claim cost O(history) or O(queue) instead of O(claimed). psycopg prepares
the claim (prepare=True), so a worker gets a generic plan sooner or later: these tests
force generic and custom plans in each statistics state and read the executed plan.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
import psycopg
import pytest

import pgbatch
from pgbatch.db.queries import query
from tests.helpers import register_noop

FLOOD = 3000
SMALL = 20
LIMIT = 64
PARAM_TYPES = {
    "worker_id": "text",
    "queue": "text",
    "tasks": "text[]",
    "limit": "int",
    "after_tenant": "text",
}
PARAM_VALUES: dict[str, Any] = {
    "worker_id": "w",
    "queue": "default",
    "tasks": ["t"],
    "limit": LIMIT,
    "after_tenant": "",
}
# What one claim may read per shard it claims: the claim index, the shard, its item block,
# a few probes per tenant and per batch. A scan of the queue or of the history reads
# thousands of rows for the same claim.
ROWS_PER_CLAIMED = 4
TABLES = ("shards", "item_blocks", "batches")


def _as_prepared(sql: str) -> tuple[str, list[str]]:
    """Return the query with its %(name)s placeholders as $1..$n, and the names in order."""
    sql = re.sub(r"^\s*--.*$", "", sql, flags=re.M).strip().rstrip(";")
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    return re.sub(r"%\((\w+)\)s", number, sql), names


def _nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    found = [plan]
    for child in plan.get("Plans", []):
        found.extend(_nodes(child))
    return found


async def _analyze(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        for table in TABLES:
            await conn.execute(f"ANALYZE pgbatch.{table}")


async def _explain(app: pgbatch.App, name: str, *, generic: bool) -> dict[str, Any]:
    """Run one claim under a forced generic or custom plan, rolled back; return its plan."""
    sql, names = _as_prepared(query(name))
    types = ", ".join(PARAM_TYPES[n] for n in names)
    mode = "force_generic_plan" if generic else "force_custom_plan"
    async with app.db.connection() as conn:
        async with conn.transaction(force_rollback=True):
            await conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
            await conn.execute(f"PREPARE claim_plan ({types}) AS {sql}")
            # Bound on the client: EXPLAIN EXECUTE takes no protocol-level parameters.
            cur = psycopg.AsyncClientCursor(conn)
            casts = ", ".join(f"%s::{PARAM_TYPES[n]}" for n in names)
            await cur.execute(
                f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE claim_plan ({casts})",
                [PARAM_VALUES[n] for n in names],
            )
            row = await cur.fetchone()
            await conn.execute("DEALLOCATE claim_plan")
    assert row is not None
    doc = row[0] if not isinstance(row[0], str | bytes) else orjson.loads(row[0])
    plan: dict[str, Any] = doc[0]["Plan"]
    return plan


def _assert_linear(plan: dict[str, Any], label: str) -> None:
    claimed = plan["Actual Rows"]
    assert claimed > 0, label
    bound = ROWS_PER_CLAIMED * claimed
    for node in _nodes(plan):
        relation = node.get("Relation Name")
        if relation in ("shards", "item_blocks"):
            assert node["Node Type"] != "Seq Scan", f"{label}: a sequential scan of {relation}"
        if relation in TABLES:
            read = node["Actual Loops"] * (
                node.get("Actual Rows", 0)
                + node.get("Rows Removed by Filter", 0)
                + node.get("Rows Removed by Index Recheck", 0)
            )
            assert read <= bound, f"{label}: {node['Node Type']} of {relation} read {read} rows"
        if node["Node Type"] in ("Sort", "Hash"):
            sorted_rows = node["Actual Loops"] * node.get("Actual Rows", 0)
            assert sorted_rows <= bound, f"{label}: a {node['Node Type']} of {sorted_rows} rows"


async def _flood_and_two_tenants(app: pgbatch.App) -> None:
    register_noop(app)
    await app.submit("t", [None] * FLOOD, shard_size=1, tenant="acme")
    for tenant in ("globex", "initech"):
        await app.submit("t", [None] * SMALL, shard_size=1, tenant=tenant)


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["shard_claim", "shard_claim_by_priority"])
async def test_claim_plans_on_statistics_from_before_any_shard_are_linear(
    app: pgbatch.App, name: str
) -> None:
    # Statistics of empty tables: the state of a new database whose first batch is big.
    await _analyze(app)
    await _flood_and_two_tenants(app)
    for generic in (True, False):
        plan = await _explain(app, name, generic=generic)
        _assert_linear(plan, f"{name}, {'generic' if generic else 'custom'}, stale statistics")


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["shard_claim", "shard_claim_by_priority"])
async def test_claim_plans_on_fresh_statistics_are_linear(app: pgbatch.App, name: str) -> None:
    await _flood_and_two_tenants(app)
    await _analyze(app)
    for generic in (True, False):
        plan = await _explain(app, name, generic=generic)
        _assert_linear(plan, f"{name}, {'generic' if generic else 'custom'}, fresh statistics")


@pytest.mark.asyncio
async def test_fair_claim_plan_stays_linear_after_half_the_flood_ran(app: pgbatch.App) -> None:
    """Claimed shards leave dead entries in the claim index: each claim steps over few."""
    from pgbatch.db.shards import claim_shards

    await _analyze(app)
    await _flood_and_two_tenants(app)
    claimed = 0
    async with app.db.connection() as conn:
        while claimed < FLOOD // 2:
            claimed += len(
                await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=256)
            )
    await _analyze(app)
    for generic in (True, False):
        plan = await _explain(app, "shard_claim", generic=generic)
        _assert_linear(plan, f"half claimed, {'generic' if generic else 'custom'}")
