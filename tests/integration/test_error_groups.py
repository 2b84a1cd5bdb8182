"""Issue 12: error groups read a bounded sample per group, whatever the failures' number.

The old result_error_groups built array_agg of every failed seq of each group and sliced
it afterwards, so its memory grew with the failed items (and array_agg does not spill).
The plan shows the difference: every aggregate that builds the sample arrays may see at
most `samples` rows per group.
"""

from __future__ import annotations

from typing import Any

import pytest

import pgbatch
from pgbatch.db.queries import query
from pgbatch.db.results import error_groups

FAILED_ITEMS = 6000
SAMPLES = 3


def _array_agg_inputs(node: dict[str, Any]) -> list[int]:
    """Rows fed, over all loops, into each aggregate that builds an array_agg."""
    found = []
    builds = any("array_agg" in column for column in node.get("Output", []))
    if node["Node Type"] == "Aggregate" and builds:
        for child in node.get("Plans", []):
            found.append(int(child["Actual Rows"] * child["Actual Loops"]))
    for child in node.get("Plans", []):
        found.extend(_array_agg_inputs(child))
    return found


@pytest.mark.asyncio
async def test_error_groups_sample_a_bounded_number_of_items_per_group(app: pgbatch.App) -> None:
    @app.task("never_run")
    async def never_run(
        items: list[pgbatch.Item], _: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        raise AssertionError("no worker runs in this test")

    batch = await app.submit("never_run", ({"n": n} for n in range(FAILED_ITEMS)), shard_size=100)
    async with app.db.connection() as conn:
        # Three errors: every item fails, as a whole batch of a broken handler would.
        # Stored as a finished shard's results are (0009): a block, and a row per failure.
        await conn.execute(
            "INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)"
            " SELECT batch_id, first_seq,"
            " ('[' || rtrim(repeat('null,', json_array_length(payloads)), ',') || ']')::json"
            " FROM pgbatch.item_blocks WHERE batch_id = %s",
            (batch.id,),
        )
        await conn.execute(
            "INSERT INTO pgbatch.result_errors (batch_id, seq, error)"
            " SELECT batch_id, seq, 'error ' || (seq %% 3) FROM pgbatch.items"
            " WHERE batch_id = %s",
            (batch.id,),
        )
        await conn.execute(
            "UPDATE pgbatch.shards SET status = 'done', finished_at = now() WHERE batch_id = %s",
            (batch.id,),
        )
        await conn.execute("ANALYZE pgbatch.result_errors")
        groups, total = await error_groups(conn, batch.id, limit=20, samples=SAMPLES)
        params = {"batch_id": batch.id, "limit": 20, "samples": SAMPLES}
        cur = await conn.execute(
            "EXPLAIN (ANALYZE, VERBOSE, FORMAT JSON) " + query("result_error_groups"), params
        )
        [[plan]] = await cur.fetchall()

    # The answer is what it was: every group, its count, first seq and first samples.
    assert total == 3
    assert [(g.error, g.items, g.first_seq) for g in groups] == [
        ("error 0", 2000, 0),
        ("error 1", 2000, 1),
        ("error 2", 2000, 2),
    ]
    assert [[seq for seq, _ in g.samples] for g in groups] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]
    assert groups[0].samples[1] == (3, {"n": 3})
    assert all(g.first_seen_at is not None and g.last_seen_at is not None for g in groups)

    inputs = _array_agg_inputs(plan[0]["Plan"])
    assert inputs, "the plan builds no array_agg: the walk found nothing to check"
    assert sum(inputs) <= SAMPLES * len(groups), inputs
