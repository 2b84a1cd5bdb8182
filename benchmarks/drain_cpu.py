"""Server and worker CPU per job of pgbatch drains at shard size 1, against a baseline tree.

Run from the repository root:

    git worktree add /tmp/base <rev>      # or: git archive <rev> src | tar -x -C /tmp/base
    .venv/bin/python benchmarks/drain_cpu.py --baseline-src /tmp/base/src [--rounds 5]
        [--jobs 50000] [--database-url URL]

Each drain is benchmarks/peers.py's pgbatch drain (its own fresh database, the jobs
enqueued first, two `peer_workers` processes at concurrency 256 released together, timed
to the last completion), run in a child process whose pgbatch is the baseline's or this
tree's (PYTHONPATH), so the migrations, the enqueue and the workers all run the code
measured. Rounds alternate the order of the two. Prints each drain's jobs/s, server and
worker CPU µs per job and the cores other processes kept busy, then the medians and the
ratio of this tree's CPU per job to the baseline's: on a shared machine the rates move
with the load, the CPU per job much less.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUNDS = 5
DEFAULT_JOBS = 50_000
# One drain of 50,000 jobs takes seconds; a child that takes this long is stuck.
CHILD_TIMEOUT_S = 900


def _one(url: str, jobs: int) -> None:
    """Run one drain in this process and print its figures as one JSON line."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import peers

    figures = asyncio.run(peers.measure_drain(url, peers.PGBATCH, jobs))
    print(
        json.dumps(
            {
                "jobs_per_s": figures.jobs_per_s,
                "server_us": figures.server_cpu_s / jobs * 1e6,
                "workers_us": figures.workers_cpu_s / jobs * 1e6,
                "other_cores": figures.other_cores,
            }
        )
    )


def _drain(url: str, jobs: int, src: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": src}
    done = subprocess.run(
        [sys.executable, __file__, "--one", "--jobs", str(jobs), "--database-url", url],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"drain on {src} failed:\n{done.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(lines[-1])
    return figures


def main() -> None:
    """Parse arguments, run the interleaved drains, print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline-src", help="src/ of the code to compare with")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import require_local, server_url

    url = server_url(args.database_url)
    require_local(url)
    if args.one:
        _one(url, args.jobs)
        return
    if not args.baseline_src:
        parser.error("--baseline-src is required")
    sides = {"baseline": str(Path(args.baseline_src).resolve()), "this tree": str(ROOT / "src")}
    results: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for number in range(1, args.rounds + 1):
        order = list(sides) if number % 2 else list(sides)[::-1]
        for side in order:
            load = os.getloadavg()[0]
            figures = _drain(url, args.jobs, sides[side])
            results[side].append(figures)
            print(f"  round {number} {side:>9}: {figures['jobs_per_s']:8,.0f} jobs/s  server "
                  f"{figures['server_us']:6.1f} µs/job  workers {figures['workers_us']:6.1f} "
                  f"µs/job  other cores {figures['other_cores']:.2f}  load {load:.1f}",
                  flush=True)  # fmt: skip
    medians = {
        side: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for side, rounds in results.items()
    }
    for side, median in medians.items():
        print(f"  median {side:>9}: {median['jobs_per_s']:8,.0f} jobs/s  server "
              f"{median['server_us']:6.1f} µs/job  workers {median['workers_us']:6.1f} "
              "µs/job")  # fmt: skip
    for key in ("server_us", "workers_us"):
        ratio = medians["this tree"][key] / medians["baseline"][key]
        print(f"  this tree / baseline, {key.removesuffix('_us')} CPU per job: x{ratio:.2f}")


if __name__ == "__main__":
    main()
