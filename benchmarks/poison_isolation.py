"""Bisection or one run per item: what does finding a shard's poison items cost?

Run from the repository root:

    .venv/bin/python benchmarks/poison_isolation.py [--items 100] [--repeat 200]

No database: the cost of isolating is the handler's, run inside the worker before the
shard's one completion. For a shard of `--items` items holding k poison items (k = 1, 3,
10, 50, spread evenly) it counts, with the engine's own isolation
(pgbatch.engine.failures.isolate: "bisect" and "per_item"), the handler calls and the
item executions each makes, and measures the wall time per isolation with a no-op
handler (pgbatch's own overhead). Then it prices both for two handler profiles:

- batching (one model or database call per run: 200 ms a call + 2 ms an item), where
  calls dominate;
- per item (an HTTP call per item: 1 ms a call + 50 ms an item), where executions do.

Writes benchmarks/results/poison_isolation.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgbatch
from pgbatch.engine.context import ShardContext
from pgbatch.engine.failures import isolate

POISON_COUNTS = (1, 3, 10, 50)
# (name, ms per handler call, ms per item executed)
PROFILES = (("batching", 200.0, 2.0), ("per item", 1.0, 50.0))


class Handler:
    """A handler that raises when a run holds a poison item, counting what it was asked."""

    def __init__(self, poison: set[int]) -> None:
        self.poison = poison
        self.calls = 0
        self.executions = 0

    async def __call__(
        self, items: list[pgbatch.Item], ctx: ShardContext
    ) -> Sequence[pgbatch.Outcome]:
        self.calls += 1
        self.executions += len(items)
        if any(item.seq in self.poison for item in items):
            raise KeyError("prompt")
        return [pgbatch.ok(item.value) for item in items]


def _ctx() -> ShardContext:
    return ShardContext(batch_id=1, shard_id=1, attempt=1, lease_epoch=1, task="bench")


async def bisect(items: list[pgbatch.Item], handler: Handler) -> int:
    """Isolate with the engine's bisection; return the poison items found."""
    found = await isolate(items, _ctx(), handler, failure=KeyError("prompt"))
    return found.poison


async def per_item(items: list[pgbatch.Item], handler: Handler) -> int:
    """Isolate by running every item alone (the engine's "per_item"); return the poison."""
    found = await isolate(items, _ctx(), handler, failure=KeyError("prompt"), strategy="per_item")
    return found.poison


async def measure(n_items: int, k: int, repeat: int) -> dict[str, object]:
    """Count and time both strategies on one shard of n_items with k poison items."""
    items = [pgbatch.Item(seq, seq) for seq in range(n_items)]
    poison = {round((i + 0.5) * n_items / k) for i in range(k)}
    row: dict[str, object] = {"items": n_items, "poison": k}
    for name, strategy in (("bisect", bisect), ("per_item", per_item)):
        handler = Handler(poison)
        assert await strategy(items, handler) == k
        # The first (failed) run of the whole shard is the same for both: not counted.
        calls, executions = handler.calls, handler.executions
        started = time.perf_counter()
        for _ in range(repeat):
            await strategy(items, Handler(poison))
        overhead_us = (time.perf_counter() - started) / repeat * 1e6
        priced = {
            profile: round(calls * call_ms + executions * item_ms)
            for profile, call_ms, item_ms in PROFILES
        }
        row[name] = {
            "calls": calls,
            "executions": executions,
            "overhead_us": round(overhead_us, 1),
            "handler_ms": priced,
        }
    return row


async def main() -> None:
    """Print the table and write the results file."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    rows = [await measure(args.items, k, args.repeat) for k in POISON_COUNTS]
    header = (
        f"{'poison':>6} | {'strategy':>8} | {'calls':>5} | {'execs':>5} | "
        f"{'overhead':>9} | {'batching':>9} | {'per item':>9}"
    )
    print(f"isolating a shard of {args.items} items (handler cost priced, overhead measured)")
    print(header)
    print("-" * len(header))
    for row in rows:
        for name in ("bisect", "per_item"):
            r = row[name]
            assert isinstance(r, dict)
            print(
                f"{row['poison']:>6} | {name:>8} | {r['calls']:>5} | {r['executions']:>5} | "
                f"{r['overhead_us']:>7} us | {r['handler_ms']['batching']:>6} ms | "
                f"{r['handler_ms']['per item']:>6} ms"
            )
    out = Path(__file__).resolve().parent / "results" / "poison_isolation.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "profiles": PROFILES}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
