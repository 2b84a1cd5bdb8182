"""Does pgbatch stay fast as finished work accumulates? Rounds of one-item-shard batches.

Run from the repository root:

    .venv/bin/python benchmarks/storage_rounds.py [--rounds 8] [--shards 50000] [--database-url URL]
        [--baseline-src DIR]

Runs the same no-op batch of `--shards` one-item shards `--rounds` times, one after the
other, in one database, with two `pgbatch worker` processes at concurrency 256 (the
setting of the storage issue's table). Prints per round: jobs/s, its ratio to round 1
(the baseline, measured in the same run on the same database), and the size of
`pgbatch.shards`, `pgbatch.items` and `pgbatch.results`, and the CPU per shard of the
workers and of their own server backends (sampled from the operating system between the
submit's commit and the batch's end: the server shared with other databases and sessions
counts only this run's claim, heartbeat and completion work); then the median ratio of rounds
2..N to round 1 and the worst. Flat storage means ratios near 1.0 and sizes that stop
growing once retention applies. Writes benchmarks/results/storage_rounds.json.

With `--baseline-src DIR` (a `src/` folder of another pgbatch, e.g. `git archive REV src |
tar -x -C /tmp/base`), odd rounds run their workers on that code and even rounds on this
tree, in the same database, workers restarted every round: a before/after comparison that
shares the database's history. It then prints the median of each side and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgbatch
from benchmarks.apps import NOOP_TASK, make_app
from benchmarks.harness import (
    WorkerProcesses,
    bench_database,
    connect,
    cpu_sample,
    fmt_int,
    require_local,
    server_info,
    server_url,
    write_results,
)

APP = "benchmarks.apps:app"
WORKER_PROCESSES = 2
CONCURRENCY = 256
BATCH_TIMEOUT_S = 1800.0
# The tables of a batch's shards, items and results: per item before migration 0009 (the
# baseline code), per shard since (pgbatch.items and pgbatch.results are views then).
TABLES = ("shards", "items", "results", "item_blocks", "result_blocks", "result_errors")


@dataclass(frozen=True, slots=True)
class Round:
    """One round: its drain speed and the tables' sizes after it."""

    number: int
    shards: int
    seconds: float
    jobs_per_s: float
    sizes_mb: dict[str, float]
    code: str = "this tree"
    # CPU per shard, microseconds: the worker processes, their server backends
    worker_us: float = 0.0
    server_us: float = 0.0


async def table_sizes_mb(conninfo: str) -> dict[str, float]:
    """Return the total size (heap, indexes, TOAST) of pgbatch's per-item tables in MB."""
    async with await connect(conninfo) as conn:
        sizes = {}
        cur = await conn.execute(
            "SELECT relname, pg_total_relation_size(oid) FROM pg_class"
            " WHERE relnamespace = 'pgbatch'::regnamespace AND relkind = 'r'"
            " AND relname = ANY(%s) ORDER BY relname",
            (list(TABLES),),
        )
        for name, size in await cur.fetchall():
            sizes[str(name)] = round(int(size) / 1e6, 1)
        return sizes


async def worker_backends(conninfo: str, prefix: str) -> list[int]:
    """Return the server processes of the worker connections (their application_name)."""
    async with await connect(conninfo) as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name LIKE %s",
            (prefix + "%",),
        )
        return [int(pid) for (pid,) in await cur.fetchall()]


async def drain(
    app: pgbatch.App, conninfo: str, number: int, shards: int, code: str, workers: WorkerProcesses
) -> Round:
    """Submit one batch of `shards` one-item shards, wait for it; return the round's figures."""
    prefix = f"bench-{workers.label}-"
    started = time.time()
    batch = await app.submit(NOOP_TASK, [None] * shards, shard_size=1)
    backends = await worker_backends(conninfo, prefix)
    before = cpu_sample([*workers.pids, *backends])
    final = await app.wait(batch.id, timeout_s=BATCH_TIMEOUT_S)
    # Backends the workers' pools opened during the round count whole (cores_since).
    backends = sorted({*backends, *await worker_backends(conninfo, prefix)})
    after = cpu_sample([*workers.pids, *backends])
    if final.items_ok != shards or final.finished_at is None:
        raise RuntimeError(f"round {number} ended {final.status}")
    wall = after.at - before.at
    worker_us = after.cores_since(before, workers.pids) * wall / shards * 1e6
    server_us = after.cores_since(before, backends) * wall / shards * 1e6
    seconds = final.finished_at.timestamp() - started
    sizes_mb = await table_sizes_mb(conninfo)
    return Round(number, shards, round(seconds, 2), round(shards / seconds), sizes_mb, code,
                 round(worker_us, 1), round(server_us, 1))  # fmt: skip


def _code_env(baseline_src: str | None) -> dict[str, str]:
    """Return PYTHONPATH for workers on `baseline_src` (first on the path), or as it is."""
    path = os.environ.get("PYTHONPATH", "")
    if baseline_src is None:
        return {"PYTHONPATH": path}
    return {"PYTHONPATH": os.pathsep.join([baseline_src, path]).rstrip(os.pathsep)}


async def run(url: str, rounds: int, shards: int, baseline_src: str | None) -> list[Round]:
    """Drain `rounds` batches of `shards` one-item shards; return each round's figures."""
    results: list[Round] = []
    async with bench_database(url, "storage") as conninfo:
        app = make_app(conninfo)
        async with app:
            for number in range(1, rounds + 1):
                on_baseline = baseline_src is not None and number % 2 == 1
                code = "baseline" if on_baseline else "this tree"
                saved = os.environ.get("PYTHONPATH")
                # child_env copies os.environ: the workers import pgbatch from the path's
                # first entry that has it.
                os.environ.update(_code_env(baseline_src if on_baseline else None))
                try:
                    async with WorkerProcesses(
                        conninfo, app=APP, count=WORKER_PROCESSES, concurrency=CONCURRENCY,
                        label="rounds",
                    ) as workers:  # fmt: skip
                        figures = await drain(app, conninfo, number, shards, code, workers)
                finally:
                    if saved is None:
                        os.environ.pop("PYTHONPATH", None)
                    else:
                        os.environ["PYTHONPATH"] = saved
                results.append(figures)
                ratio = figures.jobs_per_s / results[0].jobs_per_s
                sizes = "  ".join(f"{t} {mb:7.1f} MB" for t, mb in figures.sizes_mb.items())
                print(f"  round {number} ({code}): {fmt_int(figures.jobs_per_s):>8} jobs/s  "
                      f"x{ratio:4.2f} of round 1  cpu/shard {figures.worker_us:6.1f} us workers"
                      f" + {figures.server_us:6.1f} us server   {sizes}", flush=True)  # fmt: skip
    return results


def main() -> None:
    """Parse arguments, run the rounds, print the summary and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shards", type=int, default=50_000)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--baseline-src", default=None, help="src/ of the code to compare with")
    args = parser.parse_args()
    if args.rounds < 2 or args.shards < 1:
        parser.error("--rounds must be >= 2 and --shards >= 1")
    url = server_url(args.database_url)
    require_local(url)
    info = asyncio.run(server_info(url))
    print(f"storage rounds: {args.rounds} x {args.shards} one-item shards, "
          f"{WORKER_PROCESSES} workers x {CONCURRENCY}")  # fmt: skip
    for line in info.describe():
        print(f"  {line}")
    baseline_src = str(Path(args.baseline_src).resolve()) if args.baseline_src else None
    rounds = asyncio.run(run(url, args.rounds, args.shards, baseline_src))
    ratios = [r.jobs_per_s / rounds[0].jobs_per_s for r in rounds[1:]]
    print(f"  rounds 2..{args.rounds} vs round 1: median x{statistics.median(ratios):.2f}, "
          f"worst x{min(ratios):.2f}")  # fmt: skip
    summary: dict[str, object] = {}
    if baseline_src is not None:
        medians = {
            code: statistics.median(r.jobs_per_s for r in rounds if r.code == code)
            for code in ("baseline", "this tree")
        }
        ratio = medians["this tree"] / medians["baseline"]
        summary = {"median_jobs_per_s": medians, "this_tree_over_baseline": ratio}
        print(f"  median jobs/s: baseline {fmt_int(medians['baseline'])}, this tree "
              f"{fmt_int(medians['this tree'])}: x{ratio:.2f}")  # fmt: skip
        for field in ("worker_us", "server_us"):
            side = {
                code: statistics.median(getattr(r, field) for r in rounds if r.code == code)
                for code in ("baseline", "this tree")
            }
            summary[f"median_{field}"] = side
            change = side["this tree"] / side["baseline"]
            print(f"  median {field} per shard: baseline {side['baseline']:.1f}, this tree "
                  f"{side['this tree']:.1f}: x{change:.2f}")  # fmt: skip
    path = write_results("storage_rounds", {
        "server": asdict(info), "rounds": [asdict(r) for r in rounds],
        "median_ratio_to_round_1": statistics.median(ratios), "worst_ratio": min(ratios),
        **summary,
    })  # fmt: skip
    print(f"  wrote {path}")


if __name__ == "__main__":
    main()
