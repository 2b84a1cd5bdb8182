"""A database with LLM batches from before the llm migrations upgrades in place and runs them."""

from __future__ import annotations

import asyncio

import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm.config import LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import FakeUpstream, serving
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig
from tests.conftest import settings_for
from tests.helpers import fetch_one


@pytest.mark.asyncio
async def test_queued_llm_batches_of_the_seam_release_run_after_the_upgrade(
    database_url: str,
) -> None:
    # The seam release (c6343ea) stored llm.request items as {custom_id, url, body} and
    # had no llm tables: a plain App with a stand-in task submits such a batch.
    old = pgbatch.App(settings=settings_for(database_url))

    @old.task(llm.TASK)
    async def never_run(
        items: list[pgbatch.Item], _: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        raise AssertionError("the old release's workers are gone")

    items = [
        {"custom_id": f"c{i}", "url": "/v1/chat/completions",
         "body": {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}}
        for i in range(4)
    ]  # fmt: skip
    await old.open()
    batch = await old.submit(llm.TASK, items, shard_size=2)
    await old.close()
    assert await fetch_one(database_url, "SELECT to_regclass('pgbatch.llm_limits')") == (None,)

    fake = FakeUpstream()
    async with serving(fake) as base_url:
        # Two processes of this release open at once, as workers starting together would.
        apps = [pgbatch.App(settings=settings_for(database_url)) for _ in range(2)]
        for app in apps:
            app.use(llm.WORKLOAD)
            runner_of(app).configure(
                LlmConfig({"default": Upstream("default", UpstreamConfig(base_url=base_url))})
            )
        await asyncio.gather(*(app.open() for app in apps))
        try:
            workers = [app.worker(concurrency=2) for app in apps]
            running = [asyncio.create_task(w.run()) for w in workers]
            try:
                done = await apps[0].wait(batch.id, timeout_s=60)
            finally:
                for w in workers:
                    w.request_stop()
                await asyncio.wait_for(asyncio.gather(*running), 30)
            lines = [line async for line in llm.output_lines(apps[0], batch.id)]
            usage = await fetch_one(
                database_url,
                "SELECT sum(requests) FROM pgbatch.llm_batch_usage WHERE batch_id = %s",
                (batch.id,),
            )
        finally:
            for app in apps:
                await runner_of(app).aclose()
                await app.close()
    assert (done.items_ok, done.items_failed) == (4, 0)
    assert [line["custom_id"] for line in lines] == ["c0", "c1", "c2", "c3"]
    assert usage == (4,)
    assert await fetch_one(
        database_url, "SELECT version FROM pgbatch.workload_migrations WHERE component = 'llm'"
    ) == (1,)
