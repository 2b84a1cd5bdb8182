"""Worker processes and signals: SIGTERM drains, the drain timeout releases, two SIGTERMs stop."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from tests.apps.chaos_app import SLOW_SHARD_S, build_app
from tests.helpers import WorkerGroup, WorkerProcess, wait_until

WORKER_ENV = {"PGBATCH_RESCUE_INTERVAL_S": "0.2", "PGBATCH_POLL_INTERVAL_S": "0.2"}
# A worker process starts (imports, pool, LISTEN) and claims well within this.
START_S = 30.0
# Bound on how long a batch of a few slow shards takes once a worker runs it.
FINISH_S = 60.0
# A worker that is not draining anything exits this fast after its last step.
EXIT_SLACK_S = 10.0


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerGroup]:
    group = WorkerGroup(database_url, tmp_path, env=WORKER_ENV)
    yield group
    group.stop_all()
    print(group.logs())  # shown by pytest only when the test failed


async def _submit(database_url: str, task: str, items: int) -> pgbatch.Batch:
    app = build_app(pgbatch.Settings(database_url=database_url))
    async with app:
        return await app.submit(task, range(items))


async def _shards(conn: psycopg.AsyncConnection[Any], batch_id: int) -> dict[int, tuple[Any, ...]]:
    """Return {shard id: (status, attempts, lease_epoch, worker_id)}."""
    cur = await conn.execute(
        "SELECT id, status, attempts, lease_epoch, worker_id FROM pgbatch.shards "
        "WHERE batch_id = %s ORDER BY id",
        (batch_id,),
    )
    return {row[0]: tuple(row[1:]) for row in await cur.fetchall()}


async def _wait_running(
    conn: psycopg.AsyncConnection[Any], batch_id: int, count: int, worker: WorkerProcess
) -> dict[int, tuple[Any, ...]]:
    """Wait until `count` shards of the batch run, and return the shards."""

    async def running() -> dict[int, tuple[Any, ...]] | None:
        shards = await _shards(conn, batch_id)
        return shards if sum(s[0] == "running" for s in shards.values()) >= count else None

    return await wait_until(running, START_S, message=lambda: worker.log_tail())


async def _finish_with_fresh_worker(
    conn: psycopg.AsyncConnection[Any], workers: WorkerGroup, batch_id: int, items: int
) -> None:
    fresh = workers.start(name="fresh", concurrency=8)

    async def finished() -> bool:
        cur = await conn.execute(
            "SELECT finished_at IS NOT NULL FROM pgbatch.batches WHERE id = %s", (batch_id,)
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    await wait_until(finished, FINISH_S, message=lambda: fresh.log_tail())
    check = await verify_batch(conn, batch_id)
    assert check.items == items
    assert check.every_item_has_one_result, check
    assert check.results_ok == items, check
    assert check.shards_open == 0, check
    cur = await conn.execute(
        "SELECT count(*), count(DISTINCT seq) FROM chaos_rows WHERE batch_id = %s", (batch_id,)
    )
    assert await cur.fetchone() == (items, items), "user rows lost or doubled"


@pytest.mark.asyncio
async def test_sigterm_drains_in_flight_shards_then_exits_zero(
    database_url: str, workers: WorkerGroup
) -> None:
    # 8 shards of SLOW_SHARD_S each; the worker holds 4 at a time.
    batch = await _submit(database_url, "slow", 40)
    worker = workers.start(concurrency=4, args=["--drain-timeout-s", "20"])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        before = await _wait_running(conn, batch.id, 4, worker)
        in_flight = {sid for sid, s in before.items() if s[0] == "running"}
        signalled = time.monotonic()
        worker.send(signal.SIGTERM)
        assert await worker.wait_exit(20 + EXIT_SLACK_S) == 0, worker.log_tail()
        # Draining waits for the handlers (SLOW_SHARD_S each), not the whole drain timeout.
        assert time.monotonic() - signalled < SLOW_SHARD_S + EXIT_SLACK_S
        after = await _shards(conn, batch.id)
        # A shard done with no failed item has no row: the ones missing finished.
        done = set(before) - set(after)
        for shard_id, (status, attempts, _epoch, _worker) in after.items():
            assert status == "queued", (shard_id, status)
            if shard_id in in_flight:
                # Released without counting the attempt.
                assert attempts == before[shard_id][1] - 1, after
            else:
                # Nothing new was claimed once the drain began.
                assert attempts == 0, (shard_id, after[shard_id])
        assert done and done <= in_flight, (done, in_flight)
        cur = await conn.execute(
            "SELECT shards_done FROM pgbatch.batches WHERE id = %s", (batch.id,)
        )
        assert await cur.fetchone() == (len(done),)
        await _finish_with_fresh_worker(conn, workers, batch.id, 40)


@pytest.mark.asyncio
async def test_drain_timeout_releases_stuck_shards_and_exits(
    database_url: str, workers: WorkerGroup
) -> None:
    # `hang_first` blocks far longer than the drain on a shard's first attempt.
    batch = await _submit(database_url, "hang_first", 20)
    worker = workers.start(concurrency=4, args=["--drain-timeout-s", "1"])
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        before = await _wait_running(conn, batch.id, 4, worker)
        signalled = time.monotonic()
        worker.send(signal.SIGTERM)
        assert await worker.wait_exit(1 + EXIT_SLACK_S) == 0, worker.log_tail()
        assert time.monotonic() - signalled < 1 + EXIT_SLACK_S
        after = await _shards(conn, batch.id)
        for shard_id, (status, attempts, epoch, worker_id) in after.items():
            # Released at once: queued again, the attempt not counted, nobody holds it.
            assert (status, attempts, worker_id) == ("queued", 0, None), (shard_id, after)
            assert epoch == before[shard_id][2]
        check = await verify_batch(conn, batch.id)
        assert check.results == 0, check


@pytest.mark.asyncio
async def test_second_sigterm_stops_at_once_and_leases_are_rescued(
    database_url: str, workers: WorkerGroup
) -> None:
    # 4 shards that block on their first attempt and finish at once on the next.
    batch = await _submit(database_url, "hang_first", 20)
    worker = workers.start(concurrency=4)  # the default drain timeout: 30 s
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await _wait_running(conn, batch.id, 4, worker)
        signalled = time.monotonic()
        worker.send(signal.SIGTERM)
        await wait_until(lambda: "draining" in worker.log_tail(), START_S)
        worker.send(signal.SIGTERM)
        assert await worker.wait_exit(EXIT_SLACK_S) != 0, worker.log_tail()
        assert time.monotonic() - signalled < EXIT_SLACK_S
        after = await _shards(conn, batch.id)
        # Nothing was released: the leases are left to expire.
        assert all(s[0] == "running" and s[1] == 1 for s in after.values()), after
        await _finish_with_fresh_worker(conn, workers, batch.id, 20)
        final = await _shards(conn, batch.id)
        # The fresh worker rescued the expired leases and ran a second attempt.
        assert all(s[0] == "done" and s[1] == 2 for s in final.values()), final
