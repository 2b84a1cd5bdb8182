"""The App the API tests serve: tasks whose outcome each test can steer through its items."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pgbatch
from pgbatch import Item, Outcome, ShardContext
from pgbatch.workloads import collections, documents, llm, vectors

TASKS = ("echo", "flaky", "slow", "gated")


def build_app(settings: pgbatch.Settings) -> tuple[pgbatch.App, asyncio.Event]:
    """Return an App with the test tasks, and the event that opens the `gated` task's gate."""
    app = pgbatch.App(settings=settings)
    collections.install(app)
    app.use(documents.WORKLOAD)
    # The OpenAI Batch API under /openai/v1 (its upstream: PGBATCH_LLM_BASE_URL).
    app.use(llm.WORKLOAD)
    app.use(vectors.WORKLOAD)
    gate = asyncio.Event()

    @app.task("echo", shard_size=10)
    async def echo(items: Sequence[Item], ctx: ShardContext) -> list[Outcome]:
        """Return each item as its output."""
        return [pgbatch.ok(item.value) for item in items]

    # Not isolated: tests use "raise" for a whole dead shard ("poison" isolates, below).
    @app.task("flaky", shard_size=10, max_attempts=2, isolate_poison="off")
    async def flaky(items: Sequence[Item], ctx: ShardContext) -> list[Outcome]:
        """Fail items that say "fail"; raise (the whole shard fails) on "raise"."""
        if any(item.value == "raise" for item in items):
            raise RuntimeError("the shard asked to fail")
        return [
            pgbatch.error("asked to fail") if item.value == "fail" else pgbatch.ok(item.value)
            for item in items
        ]

    @app.task("slow", shard_size=1)
    async def slow(items: Sequence[Item], ctx: ShardContext) -> list[Outcome]:
        """Sleep `item["sleep"]` seconds per item (0.05 by default)."""
        for item in items:
            value: Any = item.value
            await asyncio.sleep(value.get("sleep", 0.05) if isinstance(value, dict) else 0.05)
        return [pgbatch.ok(None) for _ in items]

    @app.task("gated", shard_size=1)
    async def gated(items: Sequence[Item], ctx: ShardContext) -> list[Outcome]:
        """Wait until the test opens the gate (or the batch is cancelled)."""
        waiter = asyncio.ensure_future(gate.wait())
        lost = asyncio.ensure_future(ctx.wait_lost())
        await asyncio.wait({waiter, lost}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        lost.cancel()
        return [pgbatch.ok(None) for _ in items]

    @app.task("poison", shard_size=10, max_attempts=1)
    async def poison(items: Sequence[Item], ctx: ShardContext) -> list[Outcome]:
        """Raise on an item {"raise": message}: isolation fails it alone, with its traceback."""
        for item in items:
            value: Any = item.value
            if isinstance(value, dict) and "raise" in value:
                raise ValueError(value["raise"])
        return [pgbatch.ok(item.value) for item in items]

    return app, gate


# For `pgbatch serve --app tests.apps.api_app:app` in a process of its own (settings from
# the environment, DATABASE_URL included); nothing connects until the server starts.
app, _ = build_app(pgbatch.Settings())
