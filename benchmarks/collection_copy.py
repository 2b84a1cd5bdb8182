"""Collection copy: a million associations copied by pgbatch workers, against one INSERT … SELECT.

Run from the repository root:

    .venv/bin/python benchmarks/collection_copy.py [--associations 1000000] [--workers 2]
        [--concurrency 8] [--keys-per-item 1000] [--shard-size 10] [--database-url URL]

It creates a database `pgbatch_bench_copy_<pid>` on the server (DATABASE_URL, else the
embedded one), seeds a source collection, starts `pgbatch worker` processes, and times:
the same-run baseline (one `INSERT … SELECT … ON CONFLICT DO NOTHING` statement, committed)
and the pgbatch copy (submit, ranges planned server-side, until the batch has finished),
each into a fresh collection of the same table; then both again into the same targets,
where nothing is inserted. It also times the parallel ceiling: the baseline cut into one
key range per worker, the statements run at once (what the server gives that many
concurrent inserters without any engine). It prints seconds, associations/s and the
ratio of pgbatch's rate to the baseline's, writes benchmarks/results/collection_copy.json,
and drops the database. The worker processes run this module's `app`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

import pgbatch
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
from pgbatch.workloads import collections as copies
from pgbatch.workloads.collections import queries as copies_db

DEFAULT_ASSOCIATIONS = 1_000_000
# Two processes on the two cores this is measured on; each runs its own completer, so
# two completion transactions insert at once.
DEFAULT_WORKERS = 2
# Shards in flight per worker: 8 shards of 10,000 keys is one flush of ~80,000 rows.
DEFAULT_CONCURRENCY = 8
COPY_TIMEOUT_S = 600.0
SOURCE, TARGET, BASELINE_TARGET = "source", "target", "baseline-target"
PARALLEL_TARGET = "parallel-target"
# The baseline: what a user without pgbatch would run, one statement in one transaction.
_SELECT_SQL = (
    "INSERT INTO pgbatch.collection_items (tenant, collection_id, item_id) "
    "SELECT tenant, %(target)s, item_id FROM pgbatch.collection_items "
    "WHERE tenant = 'default' AND collection_id = %(source)s "
)
BASELINE_SQL = _SELECT_SQL + "ON CONFLICT DO NOTHING"
# The same statement over one key range: the parallel ceiling runs one per worker at once.
RANGE_SQL = _SELECT_SQL + "AND item_id BETWEEN %(first)s AND %(last)s ON CONFLICT DO NOTHING"


def make_app(database_url: str | None = None) -> pgbatch.App:
    """Return an App with the collection-copy task installed (URL from the environment)."""
    bench = pgbatch.App(database_url=database_url)
    copies.install(bench)
    return bench


# What `pgbatch worker --app benchmarks.collection_copy:app` runs in the worker processes.
app = make_app()


@dataclass(frozen=True, slots=True)
class Timing:
    """One copy: how long it took and what it inserted."""

    seconds: float
    inserted: int
    already_present: int

    @property
    def per_s(self) -> float:
        """Return associations handled per second (inserted or found present)."""
        return (self.inserted + self.already_present) / self.seconds


async def _checkpoint(conninfo: str) -> None:
    # Each timed copy starts right after a checkpoint, so both pay the same full-page
    # writes and neither is hit by a checkpoint the other caused.
    async with await connect(conninfo) as conn:
        await conn.execute("CHECKPOINT")


async def _reset(bench: pgbatch.App, conninfo: str, target: str, expected: int) -> None:
    """Check that `target` holds `expected` items, then empty it and vacuum the table."""
    async with bench.db.connection() as conn:
        count = await copies_db.count_collection_items(conn, "default", target)
    if count != expected:
        raise RuntimeError(f"{target} holds {count} items, not {expected}")
    await copies.delete_collection(bench, target)
    await copies.create_collection(bench, target)
    async with await connect(conninfo) as conn:
        await conn.execute("VACUUM pgbatch.collection_items")


async def baseline_copy(conninfo: str, associations: int) -> Timing:
    """Time the single INSERT … SELECT … ON CONFLICT DO NOTHING statement, committed."""
    await _checkpoint(conninfo)
    async with await connect(conninfo) as conn:
        started = time.perf_counter()
        cur = await conn.execute(BASELINE_SQL, {"source": SOURCE, "target": BASELINE_TARGET})
        elapsed = time.perf_counter() - started
    return Timing(elapsed, cur.rowcount, associations - cur.rowcount)


async def parallel_ceiling(bench: pgbatch.App, conninfo: str, statements: int) -> Timing:
    """Time the baseline cut into `statements` key ranges run at once on as many connections.

    This is what the server gives to that many concurrent inserters with no engine at all:
    the ceiling for pgbatch with as many workers.
    """
    async with bench.db.connection() as conn:
        total = await copies_db.count_collection_items(conn, "default", SOURCE)
        ranges = await copies_db.plan_copy_ranges(
            conn, "default", SOURCE, keys_per_range=-(-total // statements)
        )
    await _checkpoint(conninfo)
    conns = [await connect(conninfo) for _ in ranges]

    async def one(conn: psycopg.AsyncConnection[Any], first: str, last: str) -> int:
        params = {"source": SOURCE, "target": PARALLEL_TARGET, "first": first, "last": last}
        return (await conn.execute(RANGE_SQL, params)).rowcount

    try:
        started = time.perf_counter()
        inserted = await asyncio.gather(
            *(one(c, first, last) for c, (first, last) in zip(conns, ranges, strict=True))
        )
        elapsed = time.perf_counter() - started
    finally:
        for conn in conns:
            await conn.close()
    return Timing(elapsed, sum(inserted), total - sum(inserted))


async def pgbatch_copy(
    bench: pgbatch.App, conninfo: str, *, keys_per_item: int, shard_size: int | None
) -> tuple[Timing, copies.CopyReport, float]:
    """Time a pgbatch copy from submit until its batch finished; also the submit alone."""
    await _checkpoint(conninfo)
    started = time.perf_counter()
    batch = await copies.submit_copy(
        bench,
        source=SOURCE,
        target=TARGET,
        item_ids=None,
        keys_per_item=keys_per_item,
        shard_size=shard_size,
    )
    submitted = time.perf_counter() - started
    done = await bench.wait(batch.id, timeout_s=COPY_TIMEOUT_S)
    elapsed = time.perf_counter() - started
    if done.status != "succeeded":
        raise RuntimeError(f"the copy ended {done.status}: {done}")
    report = await copies.copy_report(bench, batch.id)
    return Timing(elapsed, report.inserted, report.already_present), report, submitted


def _line(label: str, timing: Timing, baseline: Timing | None = None) -> str:
    ratio = f"  ratio {timing.per_s / baseline.per_s:.2f}" if baseline else ""
    return (
        f"  {label:<22} {timing.seconds:7.2f} s  {fmt_int(timing.per_s):>11} associations/s"
        f"  inserted {fmt_int(timing.inserted):>9}  already present "
        f"{fmt_int(timing.already_present):>9}{ratio}"
    )


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Seed, time the baseline and pgbatch, twice each, and print the figures."""
    url = server_url(args.database_url)
    require_local(url)
    async with bench_database(url, "pgbatch_bench_copy") as conninfo:
        info = await server_info(conninfo)
        for line in info.describe():
            print(line)
        bench = make_app(conninfo)
        async with bench:
            for collection in (SOURCE, TARGET, BASELINE_TARGET, PARALLEL_TARGET):
                await copies.create_collection(bench, collection)
            started = time.perf_counter()
            seeded = await copies.seed_items(bench, SOURCE, args.associations)
            print(f"seeded {fmt_int(seeded)} associations in {time.perf_counter() - started:.2f} s")
            async with await connect(conninfo) as conn:
                # Index-only scans of the source for both sides need a fresh visibility map.
                await conn.execute("VACUUM ANALYZE pgbatch.collection_items")
            async with WorkerProcesses(
                conninfo,
                app="benchmarks.collection_copy:app",
                count=args.workers,
                concurrency=args.concurrency,
                label="copy",
            ):
                print(
                    f"{args.workers} worker processes x {args.concurrency} shards in flight; "
                    f"items of {args.keys_per_item} keys, "
                    f"{args.shard_size or copies.RANGES_PER_SHARD} items per shard"
                )
                # Each first copy starts from the same table: the source alone (the target
                # of the previous run is deleted and vacuumed away), else whichever ran
                # later would insert into a bigger table and index than the others.
                base = await baseline_copy(conninfo, seeded)
                print(_line("baseline (1 statement)", base))
                base_again = await baseline_copy(conninfo, seeded)
                print(_line("baseline again", base_again))
                await _reset(bench, conninfo, BASELINE_TARGET, seeded)
                parallel = await parallel_ceiling(bench, conninfo, args.workers)
                print(_line(f"{args.workers} statements at once", parallel, base))
                await _reset(bench, conninfo, PARALLEL_TARGET, seeded)
                first, report, submit_s = await pgbatch_copy(
                    bench, conninfo, keys_per_item=args.keys_per_item, shard_size=args.shard_size
                )
                print(_line("pgbatch", first, base))
                print(
                    f"    {first.per_s / parallel.per_s:.2f} of the parallel ceiling; "
                    f"{report.ranges_total} ranges, submit (ranges planned server-side) "
                    f"took {submit_s:.2f} s of it"
                )
                again, _, _ = await pgbatch_copy(
                    bench, conninfo, keys_per_item=args.keys_per_item, shard_size=args.shard_size
                )
                print(_line("pgbatch again", again, base_again))
                await _reset(bench, conninfo, TARGET, seeded)
    if first.inserted != seeded or again.inserted != 0:
        raise RuntimeError(f"wrong counts: first {first}, again {again}")
    figures = {
        "server": asdict(info),
        "associations": seeded,
        "workers": args.workers,
        "concurrency": args.concurrency,
        "keys_per_item": args.keys_per_item,
        "shard_size": args.shard_size or copies.RANGES_PER_SHARD,
        "ranges": report.ranges_total,
        "submit_s": submit_s,
        "baseline": {**asdict(base), "per_s": base.per_s},
        "pgbatch": {**asdict(first), "per_s": first.per_s},
        "ratio": first.per_s / base.per_s,
        "parallel_ceiling": {**asdict(parallel), "per_s": parallel.per_s},
        "ratio_to_parallel_ceiling": first.per_s / parallel.per_s,
        "baseline_again": {**asdict(base_again), "per_s": base_again.per_s},
        "pgbatch_again": {**asdict(again), "per_s": again.per_s},
        "ratio_again": again.per_s / base_again.per_s,
    }
    print(f"figures written to {write_results('collection_copy', figures)}")
    return figures


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--associations", type=int, default=DEFAULT_ASSOCIATIONS)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    parser.add_argument("--keys-per-item", type=int, default=copies.KEYS_PER_ITEM)
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--database-url", default=None)
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
