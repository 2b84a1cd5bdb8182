"""Invariant 7: session timeouts, heartbeats that never wait, retried flushes, refunded leases."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

import pgbatch
from pgbatch.db.database import Database
from pgbatch.db.sessions import SessionTimeouts
from pgbatch.db.shards import (
    ShardCompletion,
    claim_shards,
    heartbeat_shards,
    rescue_expired_leases,
)
from pgbatch.engine.completer import Completer
from pgbatch.models import ClaimedShard, ShardStatus
from tests.conftest import settings_for
from tests.helpers import fetch_one, register_noop

SHOW = (
    "SELECT current_setting('lock_timeout'), current_setting('idle_in_transaction_session_timeout')"
)


async def _claim_one(app: pgbatch.App) -> ClaimedShard:
    async with app.db.connection() as conn:
        [shard] = await claim_shards(conn, worker_id="w", queues=["default"], tasks=["t"], limit=1)
    return shard


@pytest.mark.asyncio
async def test_every_connection_carries_the_configured_timeouts(database_url: str) -> None:
    app = pgbatch.App(
        settings=settings_for(
            database_url,
            session_lock_timeout_ms=1234,
            session_idle_in_transaction_timeout_ms=4321,
        )
    )
    async with app:
        async with app.db.connection() as conn:
            assert await (await conn.execute(SHOW)).fetchone() == ("1234ms", "4321ms")
        dedicated = await app.db.connect_dedicated()
        try:
            assert await (await dedicated.execute(SHOW)).fetchone() == ("1234ms", "4321ms")
        finally:
            await dedicated.close()


@pytest.mark.asyncio
async def test_a_heartbeat_reports_a_locked_lease_busy_instead_of_waiting(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    await app.submit("t", range(2), shard_size=2)
    shard = await _claim_one(app)
    lease = [(shard.id, shard.lease_epoch)]
    # A completion flush of this worker holds the row (stuck behind a frozen session).
    async with await psycopg.AsyncConnection.connect(database_url) as holder:
        await holder.execute("SELECT 1 FROM pgbatch.shards WHERE id = %s FOR UPDATE", (shard.id,))
        async with app.db.connection() as conn:
            # Waiting would end in lock_timeout (LockNotAvailable), not in a report.
            report = await heartbeat_shards(conn, lease)
        assert (report.renewed, report.busy, report.lost) == ({}, {shard.id}, set())
        await holder.rollback()
    async with app.db.connection() as conn:
        report = await heartbeat_shards(conn, lease)
        assert (report.renewed, report.busy, report.lost) == ({shard.id: False}, set(), set())
        await conn.execute("UPDATE pgbatch.shards SET lease_epoch = lease_epoch + 1")
        report = await heartbeat_shards(conn, lease)
        assert (report.renewed, report.busy, report.lost) == ({}, set(), {shard.id})


@pytest.mark.asyncio
async def test_expired_leases_are_refunded_a_bounded_number_of_times(app: pgbatch.App) -> None:
    register_noop(app)
    await app.submit("t", range(2), shard_size=2, max_attempts=1)
    counted = []
    for _ in range(4):
        shard = await _claim_one(app)
        counted.append((shard.attempts, shard.counted_attempts))
        async with app.db.connection() as conn:
            # Its worker lost the database: the lease lapses unrenewed.
            await conn.execute("UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1s'")
            report = await rescue_expired_leases(conn, free_reruns=2)
        assert report.rescued == 1
    # Runs 2 and 3 were free; after that an expiry counts (the worker kills run 4).
    assert counted == [(1, 1), (2, 1), (3, 1), (4, 2)]
    row = await fetch_one(
        app.db.url, "SELECT value FROM pgbatch.counters WHERE name = 'lease_refunds'"
    )
    assert row == (2,)


@pytest.mark.asyncio
async def test_a_flush_that_hits_the_lock_timeout_is_retried_not_failed(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    batch = await app.submit("t", range(2), shard_size=2)
    shard = await _claim_one(app)
    holder = await psycopg.AsyncConnection.connect(database_url)
    # A frozen session holds the batch's counter row.
    await holder.execute("SELECT 1 FROM pgbatch.batches WHERE id = %s FOR UPDATE", (batch.id,))
    retries: list[int] = []

    async def release_after_first_retry() -> None:
        retries.append(1)
        await holder.rollback()

    async with Database(database_url, timeouts=SessionTimeouts(lock_timeout_ms=100)) as db:
        completer = Completer(
            db, max_batch=10, max_delay_ms=0, before_retry=release_after_first_retry
        )
        completion = ShardCompletion.build(
            shard.id,
            shard.batch_id,
            shard.lease_epoch,
            ShardStatus.DONE,
            [(i.seq, pgbatch.ok()) for i in shard.items],
        )
        try:
            outcome = await asyncio.wait_for(completer.complete(completion), 60)
        finally:
            await completer.stop()
            await holder.close()
    assert outcome.accepted and outcome.finished_batch
    assert retries == [1] and completer.transient_retries == 1
    assert (await app.get_batch(batch.id)).status == "succeeded"


@pytest.mark.asyncio
async def test_a_retry_flush_that_hits_the_lock_timeout_is_retried_without_an_attempt(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    await app.submit("t", range(2), shard_size=2)
    shard = await _claim_one(app)
    holder = await psycopg.AsyncConnection.connect(database_url)
    # A frozen session holds the shard's row: the requeue of its failed attempt waits.
    await holder.execute("SELECT 1 FROM pgbatch.shards WHERE id = %s FOR UPDATE", (shard.id,))
    retries: list[int] = []

    async def release_after_first_retry() -> None:
        retries.append(1)
        await holder.rollback()

    async with Database(database_url, timeouts=SessionTimeouts(lock_timeout_ms=100)) as db:
        completer = Completer(
            db, max_batch=10, max_delay_ms=0, before_retry=release_after_first_retry
        )
        retry = ShardCompletion.retry(
            shard.id, shard.batch_id, shard.lease_epoch, delay_s=0.0, error="boom"
        )
        try:
            outcome = await asyncio.wait_for(completer.complete(retry), 60)
        finally:
            await completer.stop()
            await holder.close()
    assert outcome.accepted and not outcome.finished_batch
    assert retries == [1] and completer.transient_retries == 1
    row = await fetch_one(
        database_url,
        "SELECT status, attempts, lease_refunds, last_error FROM pgbatch.shards WHERE id = %s",
        (shard.id,),
    )
    # The rerun spent no attempt: the one run the claim counted, nothing more.
    assert row == ("queued", 1, 0, "boom")
