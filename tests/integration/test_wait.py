"""app.wait(): one shared LISTEN connection, woken by the batch's NOTIFY, and callbacks=True."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import pgbatch
from tests.conftest import settings_for
from tests.helpers import fetch_one, wait_until

# Bound on a few one-item batches run by a worker in this event loop.
FINISH_S = 30.0


class ReadCountingApp(pgbatch.App):
    """An App that signals each read of a batch: tests wait on facts, not on time."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reads_pending = 0
        self.reads_pending_changed = asyncio.Event()
        self.read_final = asyncio.Event()

    async def get_batch(self, batch_id: int, *, tenant: str | None = None) -> pgbatch.Batch:
        """Read the batch, then signal whether it had ended."""
        batch = await super().get_batch(batch_id, tenant=tenant)
        if batch.is_final:
            self.read_final.set()
        else:
            self.reads_pending += 1
            self.reads_pending_changed.set()
        return batch


@asynccontextmanager
async def running(app: pgbatch.App) -> AsyncIterator[None]:
    worker = app.worker(concurrency=4)
    task = asyncio.create_task(worker.run())
    try:
        yield
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, FINISH_S)


async def _listen_sessions(database_url: str) -> int:
    (count,) = await fetch_one(
        database_url,
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND query LIKE 'LISTEN%%'",
    )
    return int(count)


@pytest.mark.asyncio
async def test_concurrent_waits_share_one_listen_connection(database_url: str) -> None:
    app = ReadCountingApp(settings=settings_for(database_url))

    @app.task("t", shard_size=1)
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(item.value) for item in items]

    async with app:
        batches = [await app.submit("t", [n]) for n in range(20)]
        # Twenty waits at once, before any worker runs: each reads its batch once (pending)
        # after subscribing, then sleeps on its event.
        waits = [asyncio.create_task(app.wait(b.id, timeout_s=FINISH_S)) for b in batches]
        while app.reads_pending < len(batches):
            app.reads_pending_changed.clear()
            await app.reads_pending_changed.wait()
        assert await _listen_sessions(database_url) == 1
        async with running(app):
            ended = await asyncio.gather(*waits)
        assert [b.status for b in ended] == [pgbatch.BatchStatus.SUCCEEDED] * len(batches)
        # A later wait reuses the connection; closing the app closes it.
        assert (await app.wait(batches[0].id)).id == batches[0].id
        assert await _listen_sessions(database_url) == 1

    # A closed connection's backend leaves pg_stat_activity a moment after the client hangs
    # up (seen under a loaded two-worker suite): wait for it to go, fail if it stays.
    async def listen_closed() -> bool:
        return await _listen_sessions(database_url) == 0

    await wait_until(listen_closed, 10, message="closing the app left its LISTEN session open")


@pytest.mark.asyncio
async def test_wait_with_callbacks_returns_after_the_completion_callback_committed(
    database_url: str,
) -> None:
    app = ReadCountingApp(settings=settings_for(database_url))
    entered = asyncio.Event()
    release = asyncio.Event()

    @app.task("t")
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok() for _ in items]

    @app.callback("report")
    async def report(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        entered.set()
        await release.wait()
        ctx.execute_at_commit("INSERT INTO reported VALUES (%s)", (batch.id,))

    async with app:
        async with app.db.connection() as conn:
            await conn.execute("CREATE TABLE reported (batch_id bigint)")
    async with app, running(app):
        batch = await app.submit("t", range(3), on_complete="report")
        await entered.wait()  # the batch has ended; its callback is running, held
        # A plain wait returns now: the batch is final.
        assert (await app.wait(batch.id)).is_final
        app.read_final.clear()
        waiter = asyncio.create_task(app.wait(batch.id, callbacks=True, timeout_s=FINISH_S))
        await app.read_final.wait()
        # It read the batch as ended, and waits on: the callback has not committed.
        assert not waiter.done()
        release.set()
        ended = await waiter
        assert ended.status == pgbatch.BatchStatus.SUCCEEDED
        (status,) = await fetch_one(
            database_url, "SELECT status FROM pgbatch.callbacks WHERE batch_id = %s", (batch.id,)
        )
        assert status == "done"
        assert await fetch_one(database_url, "SELECT batch_id FROM reported") == (batch.id,)


@pytest.mark.asyncio
async def test_wait_with_callbacks_on_a_batch_without_one_returns_when_it_ends(
    database_url: str,
) -> None:
    app = pgbatch.App(settings=settings_for(database_url))

    @app.task("t")
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok() for _ in items]

    async with app, running(app):
        batch = await app.submit("t", range(2))
        assert (await app.wait(batch.id, callbacks=True, timeout_s=FINISH_S)).is_final
        with pytest.raises(TimeoutError, match="did not finish"):
            pending = await app.submit("t", range(1), queue="nobody-serves-this")
            await app.wait(pending.id, timeout_s=0.2)
