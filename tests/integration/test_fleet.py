"""The fleet (issue 12 §2): the worker registry, queue pause and resume, queue depth, and
batches that say why they wait. Real PostgreSQL; workers are separate Apps (own pools)
or separate processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

import pgbatch
from pgbatch.engine.worker import Worker
from pgbatch.fleet import WaitingReason
from tests.apps.chaos_app import build_app
from tests.conftest import settings_for
from tests.helpers import WorkerGroup, fetch_one, wait_until

# Beats this often in tests, so the registry follows within a fraction of a second.
BEAT = {"worker_beat_s": 0.1, "worker_ttl_s": 1.0}


def _gated_app(
    database_url: str, gate: asyncio.Event, started: list[int], **settings: Any
) -> pgbatch.App:
    """An App whose task `held` blocks each shard until `gate` is set."""
    app = pgbatch.App(settings=settings_for(database_url, **{**BEAT, **settings}))

    @app.task(shard_size=1, queue="q1")
    async def held(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        started.append(ctx.shard_id)
        await gate.wait()
        return [pgbatch.ok(i.value) for i in items]

    return app


@asynccontextmanager
async def working(app: pgbatch.App, concurrency: int = 2) -> AsyncIterator[Worker]:
    """Run a worker of `app` for the block; it stops cleanly after."""
    await app.open()
    worker = app.worker(concurrency=concurrency)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(worker.registered.is_set, 10)
        yield worker
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 30)
        await app.close()


@pytest.mark.asyncio
async def test_two_workers_are_listed_with_their_slots_and_leave_when_they_stop(
    database_url: str,
) -> None:
    gate, started = asyncio.Event(), []
    a = _gated_app(database_url, gate, started)
    b = _gated_app(database_url, gate, started)
    reader = pgbatch.App(settings=settings_for(database_url))
    async with working(a, concurrency=2) as wa, working(b, concurrency=3) as wb:
        batch = await a.submit("held", range(4), queue="q1", shard_size=1)

        async def slots() -> dict[str, tuple[int, int]]:
            workers = await reader.workers()
            return {w.id: (w.slots_in_use, w.concurrency) for w in workers if not w.expired}

        async def four_in_use() -> bool:
            return sum(used for used, _ in (await slots()).values()) == 4

        await wait_until(four_in_use, 20, message=lambda: str(started))
        # The registry keeps beating every 0.1 s while 30 s leases are held, and does not
        # hurry their renewal (a third of the lease apart).
        beats, renewals = wa.stats.registry_beats, wa.stats.lease_heartbeats
        await wait_until(lambda: wa.stats.registry_beats >= beats + 5, 20)
        assert wa.stats.lease_heartbeats <= renewals + 1
        listed = await slots()
        assert set(listed) == {wa.worker_id, wb.worker_id}
        assert listed[wa.worker_id][1] == 2 and listed[wb.worker_id][1] == 3
        workers = {w.id: w for w in await reader.workers()}
        assert workers[wa.worker_id].queues == ("q1",)
        assert workers[wa.worker_id].tasks == ("held",)
        # Each worker's running batches: this tenant's batch, 4 shards between them.
        assert sum(w.running.get(batch.id, 0) for w in workers.values()) == 4
        # Another tenant sees the workers, never this tenant's batch ids.
        assert all(not w.running for w in await reader.workers(tenant="other"))
        gate.set()
        await reader.wait(batch.id, timeout_s=20)
    # Both stopped cleanly: gone at once, not "expired".
    assert await reader.workers() == []
    await reader.close()


@pytest.mark.asyncio
async def test_pause_stops_claims_of_every_worker_running_shards_finish_resume_claims_again(
    database_url: str,
) -> None:
    gate, started = asyncio.Event(), []
    a = _gated_app(database_url, gate, started)
    b = _gated_app(database_url, gate, started)
    reader = pgbatch.App(settings=settings_for(database_url))
    async with working(a, concurrency=1) as wa, working(b, concurrency=1) as wb:
        batch = await a.submit("held", range(6), queue="q1", shard_size=1)
        await wait_until(lambda: len(started) == 2, 20)
        await reader.pause_queue("q1")
        [queue] = [q for q in await reader.queues() if q.name == "q1"]
        assert queue.paused and queue.running_shards == 2 and queue.queued_shards == 4
        # The two running shards finish and complete normally while the queue is paused.
        gate.set()

        async def done_shards() -> int:
            # The batch's counter: a done shard's row is deleted by its completion.
            row = await fetch_one(
                database_url,
                "SELECT shards_done FROM pgbatch.batches WHERE id = %s",
                (batch.id,),
            )
            return int(row[0])

        await wait_until(lambda: _ge(done_shards, 2), 20)
        # Both workers now have free slots: let each claim twice after the pause (so a
        # whole claim statement ran after it committed) and find nothing.
        rounds = (wa.stats.claim_rounds, wb.stats.claim_rounds)
        async with reader.db.connection() as conn:
            await conn.execute("SELECT pg_notify('pgbatch_shards', 'q1')")
        await wait_until(
            lambda: (
                wa.stats.claim_rounds >= rounds[0] + 2 and wb.stats.claim_rounds >= rounds[1] + 2
            ),
            20,
        )
        assert len(started) == 2
        assert await done_shards() == 2
        got = await reader.get_batch(batch.id)
        assert (await reader.waiting_reasons([got])) == {batch.id: WaitingReason.QUEUE_PAUSED}

        assert await reader.resume_queue("q1") is True
        assert await reader.resume_queue("q1") is False  # not paused any more
        done = await reader.wait(batch.id, timeout_s=20)
        assert (done.status, done.items_ok) == ("succeeded", 6)
        # Both workers took part after the resume (each claims one shard at a time).
        assert wa.stats.shards_completed >= 2 and wb.stats.shards_completed >= 2
    await reader.close()


async def _ge(fn: Any, n: int) -> bool:
    return bool(await fn() >= n)


@pytest.mark.asyncio
async def test_a_batch_no_live_worker_serves_says_so(database_url: str) -> None:
    gate, started = asyncio.Event(), []
    gate.set()
    reader = pgbatch.App(settings=settings_for(database_url))

    @reader.task(queue="q1")
    async def held(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    @reader.task(queue="q1")
    async def orphan(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    orphaned = await reader.submit("orphan", range(3), queue="q1")
    elsewhere = await reader.submit("held", range(3), queue="q2")
    assert await reader.waiting_reasons([orphaned, elsewhere]) == {
        orphaned.id: WaitingReason.NO_LIVE_WORKER,
        elsewhere.id: WaitingReason.NO_LIVE_WORKER,
    }
    # A worker serving `held` on q1 serves neither task `orphan` nor queue q2.
    async with working(_gated_app(database_url, gate, started)):
        assert await reader.waiting_reasons([orphaned, elsewhere]) == {
            orphaned.id: WaitingReason.NO_LIVE_WORKER,
            elsewhere.id: WaitingReason.NO_LIVE_WORKER,
        }
        served = await reader.submit("held", range(3), queue="q1")
        assert await reader.waiting_reasons([served]) == {}
        await reader.wait(served.id, timeout_s=20)
    await reader.close()


@pytest.mark.asyncio
async def test_a_sigkilled_worker_expires_after_its_ttl_and_is_collected_later(
    database_url: str, tmp_path: Path
) -> None:
    env = {
        "PGBATCH_WORKER_BEAT_S": "0.1",
        "PGBATCH_WORKER_TTL_S": "1",
        "PGBATCH_WORKER_GC_AFTER_S": "3",
    }
    group = WorkerGroup(database_url, tmp_path, env=env)
    reader = build_app(settings_for(database_url))
    try:
        process = group.start(name="doomed")

        async def live_pids() -> set[int]:
            return {w.pid for w in await reader.workers() if not w.expired}

        await wait_until(lambda: _has(live_pids, process.pid), 30, message=group.logs)
        batch = await reader.submit("chaos", range(5))
        process.kill()

        async def expired() -> bool:
            workers = [w for w in await reader.workers() if w.pid == process.pid]
            return bool(workers) and workers[0].expired

        await wait_until(expired, 10)
        # Expired: it serves nothing, so the batch says no live worker serves it.
        assert await reader.waiting_reasons([await reader.get_batch(batch.id)]) == {
            batch.id: WaitingReason.NO_LIVE_WORKER
        }
        # Past gc_after_s, another worker's beat deletes the row.
        survivor = group.start(name="survivor")

        async def collected() -> bool:
            pids = {w.pid for w in await reader.workers()}
            return process.pid not in pids and survivor.pid in pids

        await wait_until(collected, 30, message=group.logs)
    finally:
        group.stop_all()
        await reader.close()


async def _has(fn: Any, value: object) -> bool:
    return value in await fn()


@pytest.mark.asyncio
async def test_queue_depth_and_oldest_wait_are_per_tenant_and_index_backed(
    app: pgbatch.App,
) -> None:
    @app.task(queue="q1")
    async def t(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    mine = await app.submit("t", range(10), shard_size=2, queue="q1", tenant="acme")
    await app.submit("t", range(3), shard_size=1, queue="q1", tenant="globex")
    async with app.db.connection() as conn:
        # The oldest of acme's shards became claimable an hour ago.
        await conn.execute(
            "UPDATE pgbatch.shards SET run_after = now() - interval '1 hour'"
            " WHERE batch_id = %s AND shard_no = 0",
            (mine.id,),
        )
    [acme] = await app.queues(tenant="acme")
    assert (acme.name, acme.queued_shards, acme.paused) == ("q1", 5, False)
    assert 3600 <= acme.oldest_queued_s < 3700
    [globex] = await app.queues(tenant="globex")
    assert globex.queued_shards == 3 and globex.oldest_queued_s < 3600
    [everyone] = await app.queues(tenant=None)
    assert everyone.queued_shards == 8 and everyone.oldest_queued_s >= 3600
    # A tenant with nothing queued sees the queue only once it is paused.
    assert await app.queues(tenant="initech") == []
    await app.pause_queue("q1")
    [paused] = await app.queues(tenant="initech")
    assert (paused.paused, paused.queued_shards) == (True, 0)
    # The depth comes from the queued shards' index, never from the shard history.
    from pgbatch.db.queries import query

    async with app.db.connection() as conn:
        await conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            row[0]
            for row in await (
                await conn.execute("EXPLAIN " + query("queue_list"), {"tenant": "acme"})
            ).fetchall()
        )
    assert "shards_tenant_claim_idx" in plan, plan


@pytest.mark.asyncio
async def test_bad_queue_names_are_refused_and_change_nothing(app: pgbatch.App) -> None:
    for name in ("", "x" * 201, "a\x00b"):
        with pytest.raises(ValueError, match="queue name"):
            await app.pause_queue(name)
    assert await app.queues(tenant=None) == []
