"""Issue 10 review: an LLM runner's pooled upstream clients belong to the event loop that
made them. A program that runs two `asyncio.run`s with one App (a script, a CLI command
after another) reused the first loop's client in the second, and `upstream_client_close()`
raised "Event loop is closed" for any App whose loop had ended (seen: test_llm_api then
test_llm_batches, run in that order, failed with it)."""

from __future__ import annotations

import asyncio

import pgbatch
from pgbatch.workloads.llm import batches
from pgbatch.workloads.llm.config import Upstream
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig

UPSTREAM = Upstream("default", UpstreamConfig(base_url="http://127.0.0.1:9/v1"))


def test_each_event_loop_gets_its_own_client_and_closing_skips_dead_loops() -> None:
    app = pgbatch.App(database_url="postgresql://127.0.0.1:9/unused")
    runner = runner_of(app)

    async def first() -> object:
        client = runner.client(UPSTREAM)
        # A real request would leave a pooled connection bound to this loop.
        assert runner.client(UPSTREAM) is client
        return client

    old = asyncio.run(first())

    async def second() -> None:
        assert runner.client(UPSTREAM) is not old, "a dead loop's client was reused"
        await batches.upstream_client_close()

    asyncio.run(second())
    asyncio.run(first())
    asyncio.run(batches.upstream_client_close())  # the first loop's client is long dead
