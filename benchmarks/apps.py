"""The pgbatch apps the benchmarks run: a no-op task and a wake-up-latency probe."""

from __future__ import annotations

import time

import pgbatch
from pgbatch import Item, Outcome, ShardContext

__all__ = [
    "DONE_CALLBACK",
    "FLAKY_EVERY",
    "FLAKY_TASK",
    "NOOP_TASK",
    "WAKEUP_TASK",
    "app",
    "make_app",
]

NOOP_TASK = "noop"
WAKEUP_TASK = "wakeup"
FLAKY_TASK = "flaky"
DONE_CALLBACK = "done"
# The flaky task fails the first attempt of every shard holding a seq divisible by this:
# 10% of one-item shards, chosen by seq so that every run fails the same shards.
FLAKY_EVERY = 10
# One shared outcome: a no-op handler should cost nothing but the list it returns.
_OK = pgbatch.ok(None)


async def noop(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Return an ok outcome with no output for every item."""
    return [_OK] * len(items)


async def wakeup(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Return the wall-clock time at which the handler started, as every item's output."""
    started = time.time()
    return [pgbatch.ok(started)] * len(items)


async def flaky(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Fail the first attempt of a shard holding a seq divisible by FLAKY_EVERY; else no-op."""
    if ctx.attempt == 1 and any(item.seq % FLAKY_EVERY == 0 for item in items):
        raise RuntimeError("flaky: first attempt fails")
    return [_OK] * len(items)


async def done(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
    """Do nothing: a completion callback whose cost is pgbatch's alone."""


def make_app(database_url: str | None = None) -> pgbatch.App:
    """Return an App with the benchmark tasks registered (URL from the environment if None)."""
    bench = pgbatch.App(database_url=database_url)
    # One attempt: a no-op never fails, and a retry would only blur the figures.
    bench.task(NOOP_TASK, max_attempts=1)(noop)
    bench.task(WAKEUP_TASK, max_attempts=1)(wakeup)
    # Two attempts: the failed one and the retry that succeeds.
    bench.task(FLAKY_TASK, max_attempts=2)(flaky)
    bench.callback(DONE_CALLBACK)(done)
    return bench


app = make_app()
