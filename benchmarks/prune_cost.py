"""What pruning a finished batch costs, by its size: chunked DELETE now, against a DROP.

Run from the repository root:

    .venv/bin/python benchmarks/prune_cost.py [--items 10,100000,1000000] [--shard-size 100]
        [--chunk-rows 10000] [--database-url URL]

For each size, writes one finished batch straight into the tables (items, shards and
results, as a worker would have left them; no worker runs), then times `App.prune` with
`--chunk-rows` rows per table per transaction: total seconds, seconds per million items,
the number of chunk transactions and their mean duration, and the VACUUM that the dead
rows then cost. Then, as the same-run baseline
of what partitioning by batch would cost instead, copies the same rows into two
standalone tables (a batch's partitions of items and results) and times `DROP TABLE`.
Writes benchmarks/results/prune_cost.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.apps import make_app
from benchmarks.harness import (
    bench_database,
    connect,
    fmt_int,
    require_local,
    server_info,
    server_url,
    write_results,
)

FILL = """
WITH b AS (
    INSERT INTO pgbatch.batches (task, status, shard_size, max_attempts, lease_ttl_s,
        total_items, total_shards, shards_done, items_ok, started_at, finished_at,
        retention_s)
    VALUES ('noop', 'succeeded', %(shard_size)s, 1, 30, %(items)s, %(shards)s, %(shards)s,
            %(items)s, now(), now(), 0)
    RETURNING id
), i AS (
    -- One item block per shard, as pgbatch stores them (0009).
    INSERT INTO pgbatch.item_blocks (batch_id, first_seq, payloads)
    SELECT b.id, g * %(shard_size)s,
           ('[' || rtrim(repeat('{"prompt": "item"},',
                                least(%(shard_size)s, %(items)s - g * %(shard_size)s)), ',')
            || ']')::json
    FROM b, generate_series(0, %(shards)s - 1) g
), s AS (
    INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task, queue,
        priority, status, attempts, max_attempts, lease_ttl_s, finished_at)
    SELECT b.id, 'default', g, g * %(shard_size)s,
           least((g + 1) * %(shard_size)s, %(items)s) - 1, 'noop', 'default', 0, 'done', 1,
           1, 30, now()
    FROM b, generate_series(0, %(shards)s - 1) g
), r AS (
    INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)
    SELECT b.id, g * %(shard_size)s,
           ('[' || rtrim(repeat('"done",',
                                least(%(shard_size)s, %(items)s - g * %(shard_size)s)), ',')
            || ']')::json
    FROM b, generate_series(0, %(shards)s - 1) g
)
SELECT id FROM b
"""


async def measure(conninfo: str, items: int, shard_size: int, chunk_rows: int) -> dict[str, Any]:
    """Fill one finished batch of `items`, prune it, then time the DROP of the same rows."""
    shards = -(-items // shard_size)
    async with await connect(conninfo) as conn:
        cur = await conn.execute(FILL, {"items": items, "shards": shards, "shard_size": shard_size})
        row = await cur.fetchone()
        assert row is not None
        batch_id = row[0]
        await conn.execute(
            "VACUUM ANALYZE pgbatch.item_blocks, pgbatch.shards, pgbatch.result_blocks"
        )
        for table in ("item_blocks", "result_blocks"):
            await conn.execute(f"DROP TABLE IF EXISTS bench_{table}_part")
            await conn.execute(
                f"CREATE TABLE bench_{table}_part (LIKE pgbatch.{table} INCLUDING ALL)"
            )
            await conn.execute(
                f"INSERT INTO bench_{table}_part SELECT * FROM pgbatch.{table}"
                f" WHERE batch_id = {batch_id}"
            )
        await conn.execute("CHECKPOINT")
    app = make_app(conninfo)
    app.settings.retention_chunk_rows = chunk_rows
    async with app:
        started = time.perf_counter()
        report = await app.prune(limit=1)
        seconds = time.perf_counter() - started
    assert report.cleaned == [batch_id], report
    async with await connect(conninfo) as conn:
        # A DELETE leaves dead rows: vacuum's pass over them is part of what it costs.
        started = time.perf_counter()
        await conn.execute("VACUUM pgbatch.item_blocks, pgbatch.shards, pgbatch.result_blocks")
        vacuum_s = time.perf_counter() - started
        started = time.perf_counter()
        await conn.execute("DROP TABLE bench_item_blocks_part, bench_result_blocks_part")
        drop_s = time.perf_counter() - started
    # One transaction per seq range, then the sweep that finds nothing left.
    chunks = -(-items // chunk_rows) + 1
    return {
        "items": items,
        "shards": shards,
        "rows_deleted": report.rows_deleted,
        "prune_s": round(seconds, 3),
        "prune_s_per_million_items": round(seconds / items * 1e6, 2),
        "chunk_transactions": chunks,
        "mean_chunk_ms": round(seconds / chunks * 1000, 1),
        "vacuum_s": round(vacuum_s, 3),
        "drop_s": round(drop_s, 4),
    }


async def run(url: str, sizes: list[int], shard_size: int, chunk_rows: int) -> list[dict[str, Any]]:
    """Measure every size in one bench database; return the figures."""
    figures = []
    async with bench_database(url, "prune_cost") as conninfo:
        async with make_app(conninfo):
            pass  # migrations
        for items in sizes:
            result = await measure(conninfo, items, shard_size, chunk_rows)
            figures.append(result)
            print(f"  {fmt_int(items):>10} items, {fmt_int(result['shards']):>8} shards: prune "
                  f"{result['prune_s']:7.3f} s ({result['prune_s_per_million_items']:6.2f} s per "
                  f"million items, {result['chunk_transactions']} chunks of "
                  f"{result['mean_chunk_ms']} ms), then VACUUM {result['vacuum_s']:.3f} s; "
                  f"DROP of the same rows {result['drop_s']:.4f} s",
                  flush=True)  # fmt: skip
    return figures


def main() -> None:
    """Parse arguments, run the measurement, print it and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="10,100000,1000000")
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--chunk-rows", type=int, default=10_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    sizes = [int(n) for n in args.items.split(",")]
    url = server_url(args.database_url)
    require_local(url)
    info = asyncio.run(server_info(url))
    print(f"prune cost: shard size {args.shard_size}, {args.chunk_rows} rows per chunk")
    for line in info.describe():
        print(f"  {line}")
    figures = asyncio.run(run(url, sizes, args.shard_size, args.chunk_rows))
    path = write_results("prune_cost", {
        "server": asdict(info), "shard_size": args.shard_size, "chunk_rows": args.chunk_rows,
        "sizes": figures,
    })  # fmt: skip
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
