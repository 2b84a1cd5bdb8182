"""Does pgbatch stay fast and small with retention on? Rounds of batches, pruned as they end.

Run from the repository root:

    .venv/bin/python benchmarks/growth.py [--rounds 20 | --drains 30] [--shards 50000]
        [--big-rounds 10] [--big-items 1000000] [--big-shard-size 100]
        [--wakeups 20] [--claim-probes 50] [--quick]
        [--storage schema|reset] [--reloptions TABLE:OPTIONS ...] [--retained N]
        [--auto-explain MS]
        [--database-url URL]

Issue 13's protocol, in one database: `--rounds` batches of `--shards` one-item no-op
shards, then `--big-rounds` batches of `--big-items` items at shard size
`--big-shard-size` (`--big-rounds 0` skips them), on two `pgbatch worker` processes at
concurrency 256 (as benchmarks/storage_rounds.py). Every batch is submitted with
`retention_s=2` (long enough to read the finished batch before it goes), the workers
prune every second (`PGBATCH_RETENTION_INTERVAL_S=1`) and may vacuum what they pruned
every second (`PGBATCH_RETENTION_VACUUM_INTERVAL_S=1`; a tree without the pruner's
vacuum ignores it). After each round the benchmark waits until the workers have pruned
that round's batch, then up to VACUUM_WAIT_S for a vacuum of `pgbatch.shards` (the
pruner's or autovacuum's), and prints:

- jobs/s (one-item rounds) or items/s (big rounds), submit to finished;
- idle claim latency: the median of `--claim-probes` calls of the engine's claim with
  nothing claimable (it reads the claim indexes' dead entries until a vacuum removes them);
- wake-up p50: `--wakeups` one-item batches submitted one at a time to the idle workers,
  submit to `app.wait()` returning, median;
- the bytes (heap, indexes, TOAST) of shards, item_blocks, result_blocks, result_errors
  and batches, against the first round of the same kind;
- autovacuum runs so far and the share of this round's shard updates that were HOT.

Then each of the issue's targets per kind of round with PASS or MISS: the last round at
least 0.9 x the first, no round below 0.8 x the median, every round's table bytes within
10 % of the first round's. `--quick` is a small run of the whole protocol (3 x 2,000
shards, 2 x 20,000 items, 5 wake-ups), to try the benchmark itself. Writes
benchmarks/results/growth.json.

Storage parameters: `--storage reset` resets every storage parameter of shards, item_blocks
and result_blocks after migrating (the tables as before migration 0010: the baseline of a
before/after run, in a database of its own); `--reloptions shards:fillfactor=90` sets more
(repeat it, one table each). `--retained N` first writes a finished batch of N one-item
shards that is kept forever (straight into the tables, then VACUUM ANALYZE): the history a
week of retention keeps, against which autovacuum's thresholds are relative. `--drains 30`
is the issue's collapse check for one-item shards: 30 rounds. `--auto-explain MS` loads
auto_explain in the benchmark database's sessions and logs the plan of every statement
slower than MS to the server's log.
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

import pgbatch
from benchmarks.apps import NOOP_TASK, WAKEUP_TASK, make_app
from benchmarks.harness import (
    WorkerProcesses,
    bench_database,
    connect,
    fmt_int,
    require_local,
    server_info,
    server_url,
    verdict,
    write_results,
)
from benchmarks.storage_rounds import APP, CONCURRENCY, WORKER_PROCESSES, table_sizes_mb
from pgbatch.db.shards import claim_shards, release_shards

BATCH_TIMEOUT_S = 1800.0
# How long a round's batch may take to be pruned by the workers (they try every second).
PRUNE_TIMEOUT_S = 300.0
# After the prune, how long the benchmark waits for a vacuum of pgbatch.shards (the
# pruner's, a second after its pass, or autovacuum's) before it measures the round: the
# same bound with and without the pruner's vacuum, so a before/after pair waits alike.
VACUUM_WAIT_S = 10.0
# Short, but long enough that the benchmark reads the finished batch before it goes.
RETENTION_S = 2.0
# The targets: the last round at least this share of the first of its kind...
LAST_OVER_FIRST_TARGET = 0.9
# ...no round below this share of the median of its kind...
SLOWEST_OVER_MEDIAN_TARGET = 0.8
# ...and table bytes after pruning within this share of the first round's.
BYTES_OVER_FIRST_TARGET = 1.10
# The tables whose storage parameters --storage/--reloptions set (one row per shard since
# migration 0009).
TABLES = ("shards", "item_blocks", "result_blocks")
# The tables whose bytes each round prints and the bytes target judges.
BYTES_TABLES = ("shards", "item_blocks", "result_blocks", "result_errors", "batches")
# The probe claims as a worker does; nothing is claimable when it runs.
PROBE_LIMIT = 64
QUICK = {"rounds": 3, "shards": 2_000, "big_rounds": 2, "big_items": 20_000, "wakeups": 5,
         "claim_probes": 10}  # fmt: skip
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


async def vacuums_of_shards(conninfo: str) -> int:
    """Return how many vacuums, manual or automatic, have processed pgbatch.shards so far."""
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT vacuum_count + autovacuum_count FROM pg_stat_all_tables"
            " WHERE relid = 'pgbatch.shards'::regclass"
        )
        row = await cur.fetchone()
        return int(row[0]) if row else 0


async def table_bytes(conninfo: str) -> dict[str, int]:
    """Return the total size in bytes (heap, indexes, TOAST) of each of BYTES_TABLES."""
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
            " WHERE relnamespace = 'pgbatch'::regnamespace AND relkind = 'r'"
            " AND relname = ANY(%s) ORDER BY relname",
            (list(BYTES_TABLES),),
        )
        return {str(name): int(size) for name, size in await cur.fetchall()}


async def idle_claim_ms(app: pgbatch.App, probes: int) -> float:
    """Median time of the engine's claim, as an idle worker runs it, with nothing claimable."""
    samples = []
    async with app.db.connection() as conn:
        for _ in range(probes):
            started = time.perf_counter()
            got = await claim_shards(conn, worker_id="growth-probe", queues=["default"],
                                     tasks=[NOOP_TASK, WAKEUP_TASK], limit=PROBE_LIMIT)  # fmt: skip
            samples.append(time.perf_counter() - started)
            if got:  # not expected after a prune; give it back to the workers at once
                await release_shards(conn, [(s.id, s.lease_epoch) for s in got])
    return statistics.median(samples) * 1000


async def wakeup_p50_ms(app: pgbatch.App, count: int) -> float:
    """Median time from submitting a one-item batch to the idle workers to its wait returning."""
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        batch = await app.submit(WAKEUP_TASK, [0], shard_size=1, retention_s=RETENTION_S)
        await app.wait(batch.id, timeout_s=BATCH_TIMEOUT_S)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples) * 1000


async def one_round(
    app: pgbatch.App, conninfo: str, kind: str, number: int, items: int, shard_size: int,
    *, wakeups: int, claim_probes: int, before: dict[str, tuple[int, int, int]],
) -> tuple[dict[str, object], dict[str, tuple[int, int, int]]]:  # fmt: skip
    """Run one batch to its prune (and vacuum); return the round's figures and table stats."""
    started = time.time()
    batch = await app.submit(NOOP_TASK, [None] * items, shard_size=shard_size,
                             retention_s=RETENTION_S)  # fmt: skip
    final = await app.wait(batch.id, timeout_s=BATCH_TIMEOUT_S)
    if final.items_ok != items or final.finished_at is None:
        raise RuntimeError(f"{kind} round {number} ended {final.status}")
    seconds = final.finished_at.timestamp() - started
    vacuums_at_end = await vacuums_of_shards(conninfo)
    deadline = time.monotonic() + PRUNE_TIMEOUT_S
    while not await pruned(conninfo, batch.id):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{kind} round {number}: batch not pruned in time")
        await asyncio.sleep(0.2)
    prune_wait_s = time.time() - final.finished_at.timestamp()
    deadline = time.monotonic() + VACUUM_WAIT_S
    while await vacuums_of_shards(conninfo) == vacuums_at_end and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    vacuumed_after_s = (
        round(time.time() - final.finished_at.timestamp(), 1)
        if await vacuums_of_shards(conninfo) > vacuums_at_end else None
    )  # fmt: skip
    sizes = await table_bytes(conninfo)
    claim_ms = await idle_claim_ms(app, claim_probes)
    wake_ms = await wakeup_p50_ms(app, wakeups) if wakeups else None
    stats = await table_stats(conninfo)
    updates = stats["shards"][1] - before["shards"][1]
    hot = stats["shards"][2] - before["shards"][2]
    figures: dict[str, object] = {
        "kind": kind, "round": number, "items": items, "shard_size": shard_size,
        "seconds": round(seconds, 3), "jobs_per_s": round(items / shard_size / seconds),
        "items_per_s": round(items / seconds), "pruned_after_s": round(prune_wait_s, 1),
        "vacuumed_after_s": vacuumed_after_s, "idle_claim_ms": round(claim_ms, 3),
        "wakeup_p50_ms": None if wake_ms is None else round(wake_ms, 1), "bytes": sizes,
        "autovacuums": {t: stats[t][0] for t in TABLES},
        "shards_hot_share": round(hot / updates, 3) if updates else None,
    }  # fmt: skip
    return figures, stats


def speed(figures: dict[str, object]) -> float:
    """Return a round's throughput: jobs/s for one-item shards, items/s for bigger ones."""
    key = "jobs_per_s" if figures["shard_size"] == 1 else "items_per_s"
    return float(str(figures[key]))


def print_round(figures: dict[str, object], first: dict[str, object]) -> None:
    """Print one round's figures against the first round of its kind."""
    unit = "jobs/s" if figures["shard_size"] == 1 else "items/s"
    sizes = figures["bytes"]
    first_sizes = first["bytes"]
    assert isinstance(sizes, dict) and isinstance(first_sizes, dict)
    shown = "  ".join(
        f"{t} {b / 1e6:.1f} MB (x{b / max(first_sizes.get(t, 0), 1):.2f})" for t, b in sizes.items()
    )
    vacuumed = figures["vacuumed_after_s"]
    wake = figures["wakeup_p50_ms"]
    print(
        f"  {figures['kind']} round {figures['round']}: {fmt_int(speed(figures)):>9} {unit}"
        f"  x{speed(figures) / speed(first):4.2f} of round 1;  idle claim "
        f"{figures['idle_claim_ms']:.2f} ms;  wake-up p50 "
        f"{'-' if wake is None else f'{wake:.1f} ms'};  pruned {figures['pruned_after_s']} s, "
        f"vacuumed {'no' if vacuumed is None else f'{vacuumed} s'} after its end",
        flush=True,
    )
    autovacuums = figures["autovacuums"]
    assert isinstance(autovacuums, dict)
    print(f"      {shown}", flush=True)
    print(f"      autovacuums so far: {' '.join(f'{t} {n}' for t, n in autovacuums.items())};"
          f"  shards updates HOT: {figures['shards_hot_share']}", flush=True)  # fmt: skip


def targets(rounds: list[dict[str, object]]) -> list[tuple[str, float, bool]]:
    """Judge one kind of round against the issue's targets: (what, ratio, passed) each."""
    speeds = [speed(f) for f in rounds]
    median = statistics.median(speeds)
    last = speeds[-1] / speeds[0]
    slowest = min(speeds) / median
    first_bytes = rounds[0]["bytes"]
    assert isinstance(first_bytes, dict)
    judged = [
        (f"last round x{LAST_OVER_FIRST_TARGET} of the first", last,
         last >= LAST_OVER_FIRST_TARGET),
        (f"slowest round x{SLOWEST_OVER_MEDIAN_TARGET} of the median", slowest,
         slowest >= SLOWEST_OVER_MEDIAN_TARGET),
    ]  # fmt: skip
    for table in first_bytes:
        # A table that holds less than a megabyte (batches, result_errors of no-op batches)
        # is judged against that megabyte: a few pages more are not growth.
        floor = max(int(first_bytes[table]), 1_000_000)
        worst = max(int(dict(f["bytes"])[table]) for f in rounds)  # type: ignore[call-overload]
        judged.append((f"{table} bytes within x{BYTES_OVER_FIRST_TARGET} of round 1",
                       worst / floor, worst <= BYTES_OVER_FIRST_TARGET * floor))  # fmt: skip
    return judged


async def run(
    url: str,
    phases: list[tuple[str, int, int, int]],
    *,
    reset: bool,
    reloptions: dict[str, str],
    auto_explain_ms: int | None,
    retained: int,
    wakeups: int,
    claim_probes: int,
) -> list[dict[str, object]]:
    """Run each phase's rounds (kind, rounds, items, shard size) with pruning on."""
    figures: list[dict[str, object]] = []
    # The workers read their settings from the environment that child_env copies.
    os.environ["PGBATCH_RETENTION_INTERVAL_S"] = "1"
    os.environ["PGBATCH_RETENTION_VACUUM_INTERVAL_S"] = "1"
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
            stats = await table_stats(conninfo)
            async with WorkerProcesses(
                conninfo, app=APP, count=WORKER_PROCESSES, concurrency=CONCURRENCY, label="growth"
            ):
                for kind, rounds, items, shard_size in phases:
                    first: dict[str, object] | None = None
                    for number in range(1, rounds + 1):
                        result, stats = await one_round(
                            app, conninfo, kind, number, items, shard_size, wakeups=wakeups,
                            claim_probes=claim_probes, before=stats,
                        )  # fmt: skip
                        first = first or result
                        figures.append(result)
                        print_round(result, first)
    return figures


def main() -> None:
    """Parse arguments, run the rounds, print the summary and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="one-item rounds")
    parser.add_argument("--drains", type=int, default=None, help="same as --rounds")
    parser.add_argument("--shards", type=int, default=50_000, help="one-item shards a round")
    parser.add_argument("--big-rounds", type=int, default=10, help="0: no big rounds")
    parser.add_argument("--big-items", type=int, default=1_000_000)
    parser.add_argument("--big-shard-size", type=int, default=100)
    parser.add_argument("--wakeups", type=int, default=20, help="one-item batches a round")
    parser.add_argument("--claim-probes", type=int, default=50, help="idle claims a round")
    parser.add_argument("--quick", action="store_true", help="a small run of the protocol")
    parser.add_argument("--storage", choices=("schema", "reset"), default="schema")
    parser.add_argument("--reloptions", action="append", default=[], metavar="TABLE:OPTIONS")
    parser.add_argument("--auto-explain", type=int, default=None, metavar="MS")
    parser.add_argument("--retained", type=int, default=0, metavar="N")
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    if args.drains is not None:
        args.rounds = args.drains
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    if args.rounds < 2 or args.shards < 1 or args.big_rounds == 1 or args.big_rounds < 0:
        parser.error("--rounds (or --drains) and --big-rounds must be >= 2 (or --big-rounds 0)")
    if args.big_items < 1 or args.big_shard_size < 1 or args.claim_probes < 1:
        parser.error("--big-items, --big-shard-size and --claim-probes must be >= 1")
    reloptions: dict[str, str] = {}
    for spec in args.reloptions:
        table, _, options = spec.partition(":")
        if table not in TABLES or not _RELOPTIONS.match(options):
            parser.error(f"--reloptions {spec!r}: want TABLE:name=value,... with TABLE in {TABLES}")
        reloptions[table] = options
    phases = [("one-item", args.rounds, args.shards, 1)]
    if args.big_rounds:
        phases.append(("big", args.big_rounds, args.big_items, args.big_shard_size))
    url = server_url(args.database_url)
    require_local(url)
    info = asyncio.run(server_info(url))
    print(f"growth: {args.rounds} x {args.shards:,} one-item shards"
          + (f", then {args.big_rounds} x {args.big_items:,} items at shard size "
             f"{args.big_shard_size}" if args.big_rounds else "")
          + f"; retention {RETENTION_S:.0f} s, workers prune (and vacuum) every second, "
          f"{WORKER_PROCESSES} workers x {CONCURRENCY}")  # fmt: skip
    for line in info.describe():
        print(f"  {line}")
    figures = asyncio.run(
        run(url, phases, reset=args.storage == "reset", reloptions=reloptions,
            auto_explain_ms=args.auto_explain, retained=args.retained, wakeups=args.wakeups,
            claim_probes=args.claim_probes)
    )  # fmt: skip
    summary: dict[str, object] = {}
    for kind, *_ in phases:
        rounds = [f for f in figures if f["kind"] == kind]
        speeds = [speed(f) for f in rounds]
        claims = [float(str(f["idle_claim_ms"])) for f in rounds]
        print(f"  {kind}: median {fmt_int(statistics.median(speeds))} "
              f"{'jobs/s' if rounds[0]['shard_size'] == 1 else 'items/s'}, first "
              f"{fmt_int(speeds[0])}, last {fmt_int(speeds[-1])}; idle claim {claims[0]:.2f} -> "
              f"{claims[-1]:.2f} ms")  # fmt: skip
        judged = targets(rounds)
        for what, ratio, passed in judged:
            print(f"    {what}: x{ratio:.2f} {verdict(passed)}")
        summary[kind] = [{"target": w, "ratio": round(r, 3), "pass": p} for w, r, p in judged]
    path = write_results("growth", {
        "server": asdict(info), "storage": args.storage, "reloptions": reloptions,
        "retained": args.retained, "phases": phases, "rounds": figures, "targets": summary,
    })  # fmt: skip
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
