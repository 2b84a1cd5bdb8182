"""The pgbatch apps the benchmarks run: a no-op task and a wake-up-latency probe."""

from __future__ import annotations

import time

import pgbatch
from pgbatch import Item, Outcome, ShardContext

__all__ = ["NOOP_TASK", "WAKEUP_TASK", "app", "make_app"]

NOOP_TASK = "noop"
WAKEUP_TASK = "wakeup"
# One shared outcome: a no-op handler should cost nothing but the list it returns.
_OK = pgbatch.ok(None)


async def noop(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Return an ok outcome with no output for every item."""
    return [_OK] * len(items)


async def wakeup(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Return the wall-clock time at which the handler started, as every item's output."""
    started = time.time()
    return [pgbatch.ok(started)] * len(items)


def make_app(database_url: str | None = None) -> pgbatch.App:
    """Return an App with the benchmark tasks registered (URL from the environment if None)."""
    bench = pgbatch.App(database_url=database_url)
    # One attempt: a no-op never fails, and a retry would only blur the figures.
    bench.task(NOOP_TASK, max_attempts=1)(noop)
    bench.task(WAKEUP_TASK, max_attempts=1)(wakeup)
    return bench


app = make_app()
