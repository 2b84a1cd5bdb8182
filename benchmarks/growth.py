"""Does pgbatch stay fast and small with retention on? Rounds of one-item-shard batches.

Run from the repository root:

    .venv/bin/python benchmarks/growth.py [--rounds 8 | --drains 30] [--shards 50000]
        [--storage schema|reset] [--reloptions TABLE:OPTIONS ...] [--retained N]
        [--auto-explain MS]
        [--database-url URL]

The same no-op batch of `--shards` one-item shards runs `--rounds` times in one database,
on two `pgbatch worker` processes at concurrency 256 (as benchmarks/storage_rounds.py),
but every batch is submitted with `retention_s=2` (long enough to read
the finished batch before it goes) and the workers prune every second
(`PGBATCH_RETENTION_INTERVAL_S=1`). After each round the benchmark waits until the
workers have pruned that round's batch, then prints its jobs/s and the bytes of
`pgbatch.shards`, `items` and `results`, each against round 1 of the same run. Flat
means jobs/s ratios near 1.0 and sizes that stop growing. Each round also shows how many
times autovacuum has processed each table so far and the share of this round's updates
of `pgbatch.shards` that were HOT (no new index entries). Writes
benchmarks/results/growth.json.

Storage parameters: `--storage reset` resets every storage parameter of the three tables
after migrating (the tables as before migration 0010: the baseline of a before/after
run, in a database of its own); `--reloptions shards:fillfactor=90` sets more (repeat it,
one table each). `--retained N` first writes a finished batch of N one-item shards that is
kept forever (straight into the tables, then VACUUM ANALYZE): the history a week of
retention keeps, against which autovacuum's thresholds are relative. `--drains 30` is
the issue's collapse check: 30 rounds, then the slowest against the median (target
>= 0.8). `--auto-explain MS` loads auto_explain in the benchmark database's sessions and
logs the plan of every statement slower than MS to the server's log.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.apps import NOOP_TASK, make_app
from benchmarks.harness import (
    WorkerProcesses,
    bench_database,
    connect,
    fmt_int,
    require_local,
    server_info,
    server_url,
    write_results,
)
from benchmarks.storage_rounds import APP, CONCURRENCY, WORKER_PROCESSES, table_sizes_mb

BATCH_TIMEOUT_S = 1800.0
# How long a round's batch may take to be pruned by the workers (they try every second).
PRUNE_TIMEOUT_S = 300.0
# Short, but long enough that the benchmark reads the finished batch before it goes.
RETENTION_S = 2.0
# The collapse target: no drain slower than this share of the median.
SLOWEST_OVER_MEDIAN_TARGET = 0.8
# The tables that hold a batch's items and results (one row per shard since migration 0009).
TABLES = ("shards", "item_blocks", "result_blocks")
# A storage parameter assignment as ALTER TABLE … SET takes it (name=value, comma-separated).
_RELOPTIONS = re.compile(r"^[a-z_.]+=[0-9a-z_.]+(,[a-z_.]+=[0-9a-z_.]+)*$")


async def set_storage(conninfo: str, reset: bool, reloptions: dict[str, str]) -> dict[str, str]:
    """Reset and/or set the tables' storage parameters; return what each table then has."""
    async with await connect(conninfo) as conn:
        for table in TABLES:
            cur = await conn.execute(
                "SELECT option_name FROM pg_options_to_table("
                "(SELECT reloptions FROM pg_class WHERE oid = %s::regclass))",
                (f"pgbatch.{table}",),
            )
            names = [str(r[0]) for r in await cur.fetchall()]
            if reset and names:
                await conn.execute(f"ALTER TABLE pgbatch.{table} RESET ({', '.join(names)})")
            if table in reloptions:
                await conn.execute(f"ALTER TABLE pgbatch.{table} SET ({reloptions[table]})")
        cur = await conn.execute(
            "SELECT relname, coalesce(array_to_string(reloptions, ','), '') FROM pg_class"
            " WHERE oid = ANY(%s::regclass[]) ORDER BY relname",
            ([f"pgbatch.{t}" for t in TABLES],),
        )
        return {str(name): str(options) for name, options in await cur.fetchall()}


RETAINED_SQL = """
WITH b AS (
    INSERT INTO pgbatch.batches (task, status, shard_size, max_attempts, lease_ttl_s,
        total_items, total_shards, shards_done, items_ok, started_at, finished_at,
        retention_s)
    VALUES ('noop', 'succeeded', 1, 1, 30, %(n)s, %(n)s, %(n)s, %(n)s, now(), now(), NULL)
    RETURNING id
), i AS (
    INSERT INTO pgbatch.item_blocks (batch_id, first_seq, payloads)
    SELECT b.id, g, '[null]'::json FROM b, generate_series(0, %(n)s - 1) g
), s AS (
    INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task, queue,
        priority, status, attempts, max_attempts, lease_ttl_s, lease_epoch, worker_id,
        finished_at)
    SELECT b.id, 'default', g, g, g, 'noop', 'default', 0, 'done', 1, 1, 30, 1, 'retained',
           now()
    FROM b, generate_series(0, %(n)s - 1) g
), r AS (
    INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)
    SELECT b.id, g, '[null]'::json FROM b, generate_series(0, %(n)s - 1) g
)
SELECT id FROM b
"""


async def write_retained(conninfo: str, shards: int) -> None:
    """Write a finished, kept-forever batch of `shards` one-item shards; vacuum and analyze."""
    async with await connect(conninfo) as conn:
        await conn.execute(RETAINED_SQL, {"n": shards})
        for table in TABLES:
            await conn.execute(f"VACUUM ANALYZE pgbatch.{table}")


async def table_stats(conninfo: str) -> dict[str, tuple[int, int, int]]:
    """Return per table (autovacuum runs so far, row updates so far, HOT updates so far)."""
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT relname, autovacuum_count, n_tup_upd, n_tup_hot_upd"
            " FROM pg_stat_user_tables WHERE schemaname = 'pgbatch' AND relname = ANY(%s)",
            (list(TABLES),),
        )
        return {str(r[0]): (int(r[1]), int(r[2]), int(r[3])) for r in await cur.fetchall()}


async def enable_auto_explain(conninfo: str, min_duration_ms: int) -> None:
    """Log the plan (with row counts) of every statement slower than `min_duration_ms`."""
    async with await connect(conninfo) as conn:
        name = (await (await conn.execute("SELECT current_database()")).fetchone() or [""])[0]
        await conn.execute(
            f"ALTER DATABASE \"{name}\" SET session_preload_libraries = 'auto_explain'"
        )
        await conn.execute(
            f'ALTER DATABASE "{name}" SET auto_explain.log_min_duration = {int(min_duration_ms)}'
        )
        # Row counts (a join filter's removed rows show a bad plan), without per-node timing.
        await conn.execute(f'ALTER DATABASE "{name}" SET auto_explain.log_analyze = on')
        await conn.execute(f'ALTER DATABASE "{name}" SET auto_explain.log_timing = off')


async def pruned(conninfo: str, batch_id: int) -> bool:
    """Tell whether the workers have pruned the batch and removed all its rows."""
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT cleaned_at IS NOT NULL FROM pgbatch.pruned_batches WHERE id = %s",
            (batch_id,),
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def run(
    url: str,
    rounds: int,
    shards: int,
    *,
    reset: bool,
    reloptions: dict[str, str],
    auto_explain_ms: int | None,
    retained: int,
) -> list[dict[str, object]]:
    """Drain `rounds` batches with pruning on; return each round's figures."""
    figures: list[dict[str, object]] = []
    # The workers read their settings from the environment that child_env copies.
    os.environ["PGBATCH_RETENTION_INTERVAL_S"] = "1"
    async with bench_database(url, "growth") as conninfo:
        app = make_app(conninfo)
        async with app:
            storage = await set_storage(conninfo, reset, reloptions)
            print(f"  storage parameters: {storage}")
            if retained:
                await write_retained(conninfo, retained)
                print(f"  retained: {retained:,} finished one-item shards kept forever, "
                      f"{await table_sizes_mb(conninfo)} MB")  # fmt: skip
            if auto_explain_ms is not None:
                await enable_auto_explain(conninfo, auto_explain_ms)
            before = await table_stats(conninfo)
            async with WorkerProcesses(
                conninfo, app=APP, count=WORKER_PROCESSES, concurrency=CONCURRENCY, label="growth"
            ):
                for number in range(1, rounds + 1):
                    started = time.time()
                    batch = await app.submit(NOOP_TASK, [None] * shards, shard_size=1,
                                             retention_s=RETENTION_S)  # fmt: skip
                    final = await app.wait(batch.id, timeout_s=BATCH_TIMEOUT_S)
                    if final.items_ok != shards or final.finished_at is None:
                        raise RuntimeError(f"round {number} ended {final.status}")
                    seconds = final.finished_at.timestamp() - started
                    deadline = time.monotonic() + PRUNE_TIMEOUT_S
                    while not await pruned(conninfo, batch.id):
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"round {number}: batch not pruned in time")
                        await asyncio.sleep(0.2)
                    prune_wait_s = time.time() - final.finished_at.timestamp()
                    sizes = await table_sizes_mb(conninfo)
                    stats = await table_stats(conninfo)
                    autovacuums = {t: stats[t][0] for t in TABLES}
                    updates = stats["shards"][1] - before["shards"][1]
                    hot = stats["shards"][2] - before["shards"][2]
                    before = stats
                    figures.append({
                        "round": number, "jobs_per_s": round(shards / seconds),
                        "pruned_after_s": round(prune_wait_s, 1), "sizes_mb": sizes,
                        "autovacuums": autovacuums,
                        "shards_hot_share": round(hot / updates, 3) if updates else None,
                    })  # fmt: skip
                    first = figures[0]
                    ratio = shards / seconds / float(str(first["jobs_per_s"]))
                    first_sizes = first["sizes_mb"]
                    assert isinstance(first_sizes, dict)
                    shown = "  ".join(
                        f"{t} {mb:6.1f} MB (x{mb / max(first_sizes[t], 0.1):4.2f})"
                        for t, mb in sizes.items()
                    )
                    print(f"  round {number}: {fmt_int(shards / seconds):>8} jobs/s  "
                          f"x{ratio:4.2f} of round 1, pruned {prune_wait_s:5.1f} s after its "
                          f"end   {shown}", flush=True)  # fmt: skip
                    vacuums = " ".join(f"{t} {n}" for t, n in autovacuums.items())
                    print(f"           autovacuums so far: {vacuums};  shards updates HOT "
                          f"this round: {hot:,} of {updates:,}", flush=True)  # fmt: skip
    return figures


def main() -> None:
    """Parse arguments, run the rounds, print the summary and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--drains", type=int, default=None, help="rounds, then slowest/median")
    parser.add_argument("--shards", type=int, default=50_000)
    parser.add_argument("--storage", choices=("schema", "reset"), default="schema")
    parser.add_argument("--reloptions", action="append", default=[], metavar="TABLE:OPTIONS")
    parser.add_argument("--auto-explain", type=int, default=None, metavar="MS")
    parser.add_argument("--retained", type=int, default=0, metavar="N")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    if args.drains is not None:
        args.rounds = args.drains
    if args.rounds < 2 or args.shards < 1:
        parser.error("--rounds (or --drains) must be >= 2 and --shards >= 1")
    reloptions: dict[str, str] = {}
    for spec in args.reloptions:
        table, _, options = spec.partition(":")
        if table not in TABLES or not _RELOPTIONS.match(options):
            parser.error(f"--reloptions {spec!r}: want TABLE:name=value,... with TABLE in {TABLES}")
        reloptions[table] = options
    url = server_url(args.database_url)
    require_local(url)
    info = asyncio.run(server_info(url))
    print(f"growth: {args.rounds} x {args.shards} one-item shards, retention "
          f"{RETENTION_S:.0f} s, workers prune every second, "
          f"{WORKER_PROCESSES} workers x {CONCURRENCY}")  # fmt: skip
    for line in info.describe():
        print(f"  {line}")
    reset = args.storage == "reset"
    figures = asyncio.run(
        run(url, args.rounds, args.shards, reset=reset, reloptions=reloptions,
            auto_explain_ms=args.auto_explain, retained=args.retained)
    )  # fmt: skip
    speeds = [float(str(f["jobs_per_s"])) for f in figures]
    ratios = [s / speeds[0] for s in speeds[1:]]
    print(f"  rounds 2..{args.rounds} vs round 1: median x{statistics.median(ratios):.2f}, "
          f"worst x{min(ratios):.2f}, last x{ratios[-1]:.2f}")  # fmt: skip
    median = statistics.median(speeds)
    slowest = min(speeds)
    verdict = "PASS" if slowest >= SLOWEST_OVER_MEDIAN_TARGET * median else "MISS"
    print(f"  slowest round {fmt_int(slowest)} jobs/s = x{slowest / median:.2f} of the median "
          f"{fmt_int(median)} (target >= x{SLOWEST_OVER_MEDIAN_TARGET}): {verdict}")  # fmt: skip
    path = write_results("growth", {
        "server": asdict(info), "storage": args.storage, "reloptions": reloptions,
        "retained": args.retained,
        "rounds": figures, "median_ratio_to_round_1": statistics.median(ratios),
        "worst_ratio": min(ratios), "slowest_over_median": slowest / median,
    })  # fmt: skip
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
