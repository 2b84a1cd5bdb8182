"""Invariant 7: a worker frozen inside its completion transaction does not wedge the batch."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from tests.apps.freeze_app import FREEZE_ENV, STEADY_LEASE_TTL_S
from tests.helpers import WorkerGroup, WorkerProcess, fetch_one, wait_until

FREEZE_APP = "tests.apps.freeze_app:app"
# Session timeouts well below the `steady` lease (4 s), as the docs ask: a flush waits
# 0.5 s for the frozen session's row lock, and the server ends that session after 1.5 s.
WORKER_ENV = {
    "PGBATCH_RESCUE_INTERVAL_S": "0.2",
    "PGBATCH_POLL_INTERVAL_S": "0.2",
    "PGBATCH_SESSION_LOCK_TIMEOUT_MS": "500",
    "PGBATCH_SESSION_IDLE_IN_TRANSACTION_TIMEOUT_MS": "1500",
}
ITEMS = 600
# A worker process starts, claims and flushes well within this.
START_S = 60.0
# The batch (60 shards of 0.2 s on 2 x 4 slots) finishes well within this once unwedged.
FINISH_S = 90.0


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerGroup]:
    group = WorkerGroup(database_url, tmp_path, env=WORKER_ENV)
    yield group
    group.stop_all()
    print(group.logs())  # shown by pytest only when the test failed


def _state(process: WorkerProcess) -> str:
    """Return the process's state letter from /proc (T: stopped by a signal)."""
    stat = Path(f"/proc/{process.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.mark.asyncio
async def test_a_worker_frozen_before_its_commit_does_not_stop_the_others(
    database_url: str, workers: WorkerGroup
) -> None:
    frozen = WorkerProcess(
        database_url,
        workers.log_dir / "frozen.log",
        app=FREEZE_APP,
        env={**WORKER_ENV, FREEZE_ENV: "1"},
    )
    workers.processes.append(frozen)
    app = pgbatch.App(settings=pgbatch.Settings(database_url=database_url))

    @app.task(name="steady")
    async def steady(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        raise AssertionError("only the worker processes run it")

    async with app:
        batch = await app.submit(
            "steady", range(ITEMS), shard_size=10, max_attempts=1, lease_ttl_s=STEADY_LEASE_TTL_S
        )
    await wait_until(lambda: _state(frozen) == "T", START_S, message=lambda: frozen.log_tail())
    frozen.stalled = True  # so that teardown sends SIGCONT before SIGTERM
    for name in ("b", "c"):
        workers.processes.append(
            WorkerProcess(database_url, workers.log_dir / f"{name}.log", app=FREEZE_APP,
                          env=WORKER_ENV)
        )  # fmt: skip

    async def finished() -> bool:
        row = await fetch_one(
            database_url, "SELECT finished_at IS NOT NULL FROM pgbatch.batches WHERE id = %s",
            (batch.id,),
        )  # fmt: skip
        return bool(row and row[0])

    await wait_until(finished, FINISH_S, message=workers.logs)
    # Everything was committed by the other workers while the frozen one still held the
    # batch row in its open transaction: the server ended that session, not the worker.
    assert _state(frozen) == "T"
    row = await fetch_one(
        database_url,
        "SELECT status, shards_dead, items_ok, items_failed FROM pgbatch.batches WHERE id = %s",
        (batch.id,),
    )
    assert tuple(row) == ("succeeded", 0, ITEMS, 0), workers.logs()
    # Exactly once: one user row per item, though the frozen flush had written its rows.
    rows = await fetch_one(
        database_url, "SELECT count(*), count(DISTINCT seq) FROM chaos_rows WHERE batch_id = %s",
        (batch.id,),
    )  # fmt: skip
    assert tuple(rows) == (ITEMS, ITEMS)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        check = await verify_batch(conn, batch.id)
    assert check.every_item_has_one_result, check
    # Woken up, the frozen worker finds its transaction gone and its flush fenced out.
    frozen.resume()
    frozen.send(signal.SIGTERM)
    frozen.terminated = True
    assert await frozen.wait_exit(60) == 0
