"""Does pgbatch stay fast and small with retention on? Rounds of one-item-shard batches.

Run from the repository root:

    .venv/bin/python benchmarks/growth.py [--rounds 8] [--shards 50000] [--database-url URL]

The same no-op batch of `--shards` one-item shards runs `--rounds` times in one database,
on two `pgbatch worker` processes at concurrency 256 (as benchmarks/storage_rounds.py),
but every batch is submitted with `retention_s=2` (long enough to read
the finished batch before it goes) and the workers prune every second
(`PGBATCH_RETENTION_INTERVAL_S=1`). After each round the benchmark waits until the
workers have pruned that round's batch, then prints its jobs/s and the bytes of
`pgbatch.shards`, `items` and `results`, each against round 1 of the same run. Flat
means jobs/s ratios near 1.0 and sizes that stop growing. Writes
benchmarks/results/growth.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
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


async def pruned(conninfo: str, batch_id: int) -> bool:
    """Tell whether the workers have pruned the batch and removed all its rows."""
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT cleaned_at IS NOT NULL FROM pgbatch.pruned_batches WHERE id = %s",
            (batch_id,),
        )
        row = await cur.fetchone()
        return bool(row and row[0])


async def run(url: str, rounds: int, shards: int) -> list[dict[str, object]]:
    """Drain `rounds` batches with pruning on; return each round's figures."""
    figures: list[dict[str, object]] = []
    # The workers read their settings from the environment that child_env copies.
    os.environ["PGBATCH_RETENTION_INTERVAL_S"] = "1"
    async with bench_database(url, "growth") as conninfo:
        app = make_app(conninfo)
        async with app:
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
                    figures.append({
                        "round": number, "jobs_per_s": round(shards / seconds),
                        "pruned_after_s": round(prune_wait_s, 1), "sizes_mb": sizes,
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
    return figures


def main() -> None:
    """Parse arguments, run the rounds, print the summary and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shards", type=int, default=50_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()
    if args.rounds < 2 or args.shards < 1:
        parser.error("--rounds must be >= 2 and --shards >= 1")
    url = server_url(args.database_url)
    require_local(url)
    info = asyncio.run(server_info(url))
    print(f"growth: {args.rounds} x {args.shards} one-item shards, retention "
          f"{RETENTION_S:.0f} s, workers prune every second, "
          f"{WORKER_PROCESSES} workers x {CONCURRENCY}")  # fmt: skip
    for line in info.describe():
        print(f"  {line}")
    figures = asyncio.run(run(url, args.rounds, args.shards))
    speeds = [float(str(f["jobs_per_s"])) for f in figures]
    ratios = [s / speeds[0] for s in speeds[1:]]
    print(f"  rounds 2..{args.rounds} vs round 1: median x{statistics.median(ratios):.2f}, "
          f"worst x{min(ratios):.2f}, last x{ratios[-1]:.2f}")  # fmt: skip
    path = write_results("growth", {
        "server": asdict(info), "rounds": figures,
        "median_ratio_to_round_1": statistics.median(ratios), "worst_ratio": min(ratios),
    })  # fmt: skip
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
