"""Tenant fairness of the claim: tenant B's small batch behind tenant A's top-priority flood.

Run from the repository root:

    .venv/bin/python benchmarks/tenant_fairness.py [--rounds 5] [--database-url URL]

On a fresh database `pgbatch_fair_<pid>` (DATABASE_URL, else the embedded server) one
worker (in this process, `--concurrency` slots) runs a task that sleeps `--shard-ms` per
shard. Each round, tenant A submits a flood of `--flood` one-item shards at priority
2^31-1, then tenant B submits `--small` one-item shards at priority 0, and the round times
B's batch from submit to finished (the server's created_at to finished_at); then A's
flood is cancelled. Rounds alternate between the fair claim (today's) and the
priority-only claim it replaced (the baseline), in the same run on the same database, in
alternating order; the figures are medians.

It also times the claim statement alone on a one-tenant queue (a claim of `--limit`
shards, rolled back so every repetition sees the same queue), fair against priority-only,
and prints the ratio. Results go to benchmarks/results/tenant_fairness.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgbatch
from benchmarks.harness import bench_database, fmt_ms, require_local, server_url, write_results
from pgbatch.db import shards as shard_queries
from pgbatch.engine import worker as worker_module

TOP_PRIORITY = 2**31 - 1
MODES = ("fair", "priority-only")


def _use_claim(mode: str) -> None:
    """Make the worker claim with the fair claim or with the priority-only baseline."""
    fair = mode == "fair"

    async def claim(*args: Any, **kwargs: Any) -> list[pgbatch.models.ClaimedShard]:
        return await shard_queries.claim_shards(*args, **kwargs, fair=fair)

    worker_module.claim_shards = claim  # type: ignore[assignment]


async def _fairness_round(app: pgbatch.App, args: argparse.Namespace, mode: str) -> float:
    """Return how long B's small batch took behind A's flood with the claim `mode`."""
    _use_claim(mode)
    flood = await app.submit(
        "sleep", range(args.flood), shard_size=1, tenant="a", priority=TOP_PRIORITY
    )
    small = await app.submit("sleep", range(args.small), shard_size=1, tenant="b")
    done = await app.wait(small.id, timeout_s=600)
    assert done.finished_at is not None
    # The server's own timestamps: app.wait() shows at most 10 snapshots a second, which
    # would round the fair claim's figure up to its next tenth of a second.
    latency = (done.finished_at - done.created_at).total_seconds()
    await app.cancel(flood.id)
    await app.wait(flood.id, timeout_s=600)  # its running shards end: the next round is clean
    return latency


async def _claim_cost(app: pgbatch.App, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one claim statement of `limit` shards on a one-tenant queue."""
    await app.submit("sleep", range(args.queued), shard_size=1, tenant="a", queue="cost")
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    async with app.db.connection() as conn:
        for rep in range(args.claims):
            order = MODES if rep % 2 == 0 else MODES[::-1]
            for mode in order:
                async with conn.transaction(force_rollback=True):
                    started = time.perf_counter()
                    shards = await shard_queries.claim_shards(
                        conn,
                        worker_id="bench",
                        queues=["cost"],
                        tasks=["sleep"],
                        limit=args.limit,
                        fair=mode == "fair",
                    )
                    times[mode].append(time.perf_counter() - started)
                assert len(shards) == args.limit
    return {mode: statistics.median(values) for mode, values in times.items()}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure and print; return the figures."""
    url = server_url(args.database_url)
    require_local(url)
    async with bench_database(url, "pgbatch_fair") as conninfo:
        settings = pgbatch.Settings.model_validate(
            {"database_url": conninfo, "poll_interval_s": 0.2}
        )
        app = pgbatch.App(settings=settings)
        delay_s = args.shard_ms / 1000

        @app.task("sleep", shard_size=1, max_attempts=1)
        async def sleep(
            items: list[pgbatch.Item], ctx: pgbatch.ShardContext
        ) -> list[pgbatch.Outcome]:
            await asyncio.sleep(delay_s)
            return [pgbatch.ok(None) for _ in items]

        await app.open()
        worker = app.worker(concurrency=args.concurrency)
        working = asyncio.create_task(worker.run())
        latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
        try:
            for round_no in range(args.rounds):
                order = MODES if round_no % 2 == 0 else MODES[::-1]
                for mode in order:
                    latency = await _fairness_round(app, args, mode)
                    latencies[mode].append(latency)
                    print(f"round {round_no + 1} {mode:>13}: B's batch in {fmt_ms(latency)}")
        finally:
            _use_claim("fair")
            worker.request_stop()
            await working
        cost = await _claim_cost(app, args)
        await app.close()
    medians = {mode: statistics.median(values) for mode, values in latencies.items()}
    ratio = cost["fair"] / cost["priority-only"]
    print(
        f"\nB's {args.small}-shard batch behind A's {args.flood}-shard top-priority flood "
        f"({args.concurrency} slots, {args.shard_ms} ms per shard), median of {args.rounds}:"
    )
    for mode in MODES:
        print(f"  {mode:>13} claim: {fmt_ms(medians[mode])}")
    print(f"  speed-up: {medians['priority-only'] / medians['fair']:.1f}x")
    print(
        f"\none-tenant claim of {args.limit} shards from {args.queued} queued, "
        f"median of {args.claims}:"
    )
    for mode in MODES:
        print(f"  {mode:>13} claim: {fmt_ms(cost[mode])}")
    print(f"  fair / priority-only: {ratio:.2f}")
    figures = {
        "args": vars(args),
        "small_batch_latency_s": medians,
        "small_batch_latencies_s": latencies,
        "single_tenant_claim_s": cost,
        "single_tenant_claim_ratio": ratio,
    }
    path = write_results("tenant_fairness", figures)
    print(f"\nwrote {path}")
    return figures


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flood", type=int, default=400, help="A's shards per round")
    parser.add_argument("--small", type=int, default=5, help="B's shards per round")
    parser.add_argument("--shard-ms", type=float, default=20.0, help="handler time per shard")
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's slots")
    parser.add_argument("--queued", type=int, default=20_000, help="shards for the claim cost")
    parser.add_argument("--limit", type=int, default=32, help="shards per timed claim")
    parser.add_argument("--claims", type=int, default=300, help="timed claims per mode")
    asyncio.run(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
