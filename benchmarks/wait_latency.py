"""What `app.wait()` costs on top of the batch's own time: one-item batches, idle workers.

Each round submits a one-item batch of the `wakeup` task (its output is the time the
handler started) to an idle `pgbatch worker` process, and waits for it three ways, in a
rotating order:

- `wait`: `app.wait(id)`;
- `wait+callback`: `app.wait(id, callbacks=True)` on a batch with a no-op completion callback;
- `legacy`: the wait of before issue 12 (`async for b in app.watch(id)` until it ends: a
  LISTEN connection per call and snapshots throttled to 0.1 s), for a same-run comparison.

The batch's own end is when the last NOTIFY about it arrives on an independent LISTEN
connection (sent at the commit of its last completion, or of its callback); a wait's
overhead is the time from there to the wait's return. The baseline is submit → handler
start in the same run. Target (issue 12): overhead ≤ 10 ms.

    .venv/bin/python benchmarks/wait_latency.py [--rounds 30] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pgbatch

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.apps import DONE_CALLBACK, WAKEUP_TASK, make_app
from benchmarks.harness import (
    WorkerProcesses,
    bench_database,
    fmt_ms,
    require_local,
    server_url,
    verdict,
    write_results,
)

DEFAULT_ROUNDS = 30
# The first rounds warm the connections, the worker and the plans; not counted.
WARMUP_ROUNDS = 3
# issue 12: a wait should cost at most this over the batch's own time.
TARGET_OVERHEAD_S = 0.010
# After a wait returned, the observer is given this long to log the batch's last NOTIFY
# (it may be handled just after the waiter's, in the same event loop).
OBSERVER_GRACE_S = 0.05
VARIANTS = ("wait", "wait+callback", "legacy")


async def _legacy_wait(app: pgbatch.App, batch_id: int) -> pgbatch.Batch:
    """Wait as `app.wait()` did before: through `app.watch()`, until the batch ends."""
    async for batch in app.watch(batch_id, poll_interval_s=0.5):
        if batch.is_final:
            return batch
    return await app.get_batch(batch_id)


async def _one(
    app: pgbatch.App, variant: str, notified: dict[int, list[float]]
) -> dict[str, float]:
    submitted = time.time()
    batch = await app.submit(
        WAKEUP_TASK, [0], shard_size=1,
        on_complete=DONE_CALLBACK if variant == "wait+callback" else None,
    )  # fmt: skip
    if variant == "wait":
        final = await app.wait(batch.id)
    elif variant == "wait+callback":
        final = await app.wait(batch.id, callbacks=True)
    else:
        final = await _legacy_wait(app, batch.id)
    returned = time.time()
    assert final.status == pgbatch.BatchStatus.SUCCEEDED, final
    await asyncio.sleep(OBSERVER_GRACE_S)
    [(_, outcome)] = [row async for row in app.results(batch.id)]
    ended = max(notified[batch.id])
    return {
        "handler_start_s": float(outcome.output) - submitted,
        "batch_s": ended - submitted,
        "total_s": returned - submitted,
        "overhead_s": returned - ended,
    }


async def run(url: str, rounds: int) -> dict[str, Any]:
    """Measure every variant `rounds` times, interleaved; return the figures."""
    async with bench_database(url, "pgbatch_bench_wait") as conninfo:
        app = make_app(conninfo)
        notified: dict[int, list[float]] = defaultdict(list)
        samples: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
        async with (
            app,
            app.progress_notifications(lambda batch_id: notified[batch_id].append(time.time())),
            WorkerProcesses(
                conninfo, app="benchmarks.apps:app", count=1, concurrency=4, label="wait"
            ),  # fmt: skip
        ):
            for round_no in range(WARMUP_ROUNDS + rounds):
                shift = round_no % len(VARIANTS)
                for variant in VARIANTS[shift:] + VARIANTS[:shift]:
                    figures = await _one(app, variant, notified)
                    if round_no >= WARMUP_ROUNDS:
                        samples[variant].append(figures)
    return {
        variant: {
            key: statistics.median(s[key] for s in runs)
            for key in ("handler_start_s", "batch_s", "total_s", "overhead_s")
        }
        for variant, runs in samples.items()
    } | {"rounds": rounds}


def report(figures: dict[str, Any]) -> None:
    """Print the medians, the ratio of each overhead to the baseline, and the verdict."""
    baseline = statistics.median(figures[v]["handler_start_s"] for v in VARIANTS)
    print(f"medians of {figures['rounds']} rounds; baseline submit → handler start: "
          f"{fmt_ms(baseline)}")  # fmt: skip
    print(f"{'variant':<15}{'batch':>12}{'wait returns':>15}{'overhead':>12}{'/ baseline':>12}")
    for variant in VARIANTS:
        f = figures[variant]
        print(
            f"{variant:<15}{fmt_ms(f['batch_s']):>12}{fmt_ms(f['total_s']):>15}"
            f"{fmt_ms(f['overhead_s']):>12}{f['overhead_s'] / baseline:>11.2f}x"
        )
    for variant in ("wait", "wait+callback"):
        overhead = figures[variant]["overhead_s"]
        print(f"{variant}: overhead {fmt_ms(overhead)} ≤ {fmt_ms(TARGET_OVERHEAD_S)}: "
              f"{verdict(overhead <= TARGET_OVERHEAD_S)}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and write benchmarks/results/wait_latency.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="counted rounds")
    parser.add_argument(
        "--database-url", help="server to use (default: DATABASE_URL, else the embedded one)"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    url = server_url(args.database_url)
    require_local(url)
    figures = asyncio.run(run(url, args.rounds))
    report(figures)
    print(f"\nfigures written to {write_results('wait_latency', figures)}")


if __name__ == "__main__":
    main()
