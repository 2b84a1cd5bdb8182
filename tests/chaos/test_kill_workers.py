"""Chaos: workers are SIGKILLed, frozen and restarted mid-batch; nothing is lost or doubled.

Retention runs all along (issue 13): the workers prune every few tenths of a second, and
small batches with a zero retention are submitted between chaos events, so they finish and
are pruned (by workers that may be killed or frozen mid-pass) while the big batch runs.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.verify import verify_batch
from tests.apps.chaos_app import build_app
from tests.helpers import WorkerGroup, WorkerProcess, poll, wait_until

# Worker settings: rescue and poll fast so that lost shards come back within the 2 s
# lease of the `chaos` task; a killed callback's lease is as short.
WORKER_ENV = {
    "PGBATCH_RESCUE_INTERVAL_S": "0.2",
    "PGBATCH_POLL_INTERVAL_S": "0.2",
    "PGBATCH_CALLBACK_LEASE_TTL_S": "2",
    # Prune often, so that passes overlap the chaos and are killed or frozen mid-way.
    "PGBATCH_RETENTION_INTERVAL_S": "0.3",
}
# A frozen worker stays frozen this long: past its 2 s lease, so its shards are rescued
# and re-claimed while it still believes it holds them (a zombie), and it wakes up while
# their new holders may still be running them.
STALL_S = (2.2, 3.5)
# The callback runs once the batch has ended; it is quick, this is a generous bound.
CALLBACK_WAIT_S = 30.0
# Every small batch is pruned within a few passes of its callback; a generous bound.
PRUNE_WAIT_S = 60.0
WORKER_STOP_S = 30.0


def _seed() -> int:
    # The seed fixes the sequence of events (which worker, kill or freeze, pauses), not
    # the timing; PGBATCH_CHAOS_SEED replays the sequence of a failed run.
    return int(os.environ.get("PGBATCH_CHAOS_SEED") or random.randrange(2**32))


@dataclass(frozen=True, slots=True)
class ChaosPlan:
    """How hard to shake the workers."""

    items: int
    deadline_s: float
    pause_s: tuple[float, float] = (0.8, 1.2)  # between two chaos events
    stall_share: float = 0.25  # the other events are SIGKILL + restart
    workers: int = 3
    concurrency: int = 8
    seed: int = field(default_factory=_seed)
    # Items of each small batch submitted between two chaos events (task `brief`, shards of
    # 5, no sleep: a few shards each, so they add little work), pruned at once when final.
    pruned_items: int = 10


@dataclass(slots=True)
class ChaosLog:
    """What the chaos did."""

    kills: int = 0
    stalls: int = 0
    events: list[str] = field(default_factory=list)
    # the small batches that retention must prune while the big one runs
    pruned_batches: list[int] = field(default_factory=list)


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerGroup]:
    runs = tmp_path / "runs"
    runs.mkdir()
    group = WorkerGroup(database_url, tmp_path, env={**WORKER_ENV, "CHAOS_RUN_LOG": str(runs)})
    yield group
    group.stop_all()
    # Shown by pytest only when the test failed.
    print(group.logs())


async def _run_chaos(database_url: str, workers: WorkerGroup, plan: ChaosPlan) -> None:
    rng = random.Random(plan.seed)
    print(f"chaos plan: {plan}")
    app = build_app(pgbatch.Settings(database_url=database_url))
    await app.open()
    try:
        batch = await app.submit("chaos", range(plan.items), on_complete="record_done")
        slots: list[WorkerProcess] = [
            workers.start(name=f"slot{n}", concurrency=plan.concurrency)
            for n in range(plan.workers)
        ]
        log = ChaosLog()
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            state = {"finished": False, "open_shards": -1}

            async def settled() -> bool:
                # One statement, one snapshot. A shard's terminal status and the batch
                # counters commit together (invariants 2 and 3), so "no shard left open
                # but the batch not finished" is never transient: it is a lost count.
                cur = await conn.execute(
                    """
                    SELECT b.finished_at IS NOT NULL,
                           (SELECT count(*) FROM pgbatch.shards s WHERE s.batch_id = b.id
                              AND s.status IN ('queued', 'running'))
                    FROM pgbatch.batches b WHERE b.id = %s
                    """,
                    (batch.id,),
                )
                row = await cur.fetchone()
                assert row is not None
                state["finished"], state["open_shards"] = row
                return bool(state["finished"]) or state["open_shards"] == 0

            # The pause between two events is itself a wait for the end of the batch.
            while not await poll(settled, rng.uniform(*plan.pause_s)):
                elapsed = time.monotonic() - started
                if elapsed > plan.deadline_s:
                    pytest.fail(
                        f"batch {batch.id} did not end within {plan.deadline_s} s "
                        f"(seed {plan.seed})\n{await _shard_report(conn, batch.id)}\n"
                        f"events: {log.events}"
                    )
                # Priority 1: claimed before the big batch's shards, so each finishes (and
                # can be pruned) while the big batch still runs.
                small = await app.submit("brief", range(plan.pruned_items), priority=1,
                                         retention_s=0, on_complete="record_done")  # fmt: skip
                log.pruned_batches.append(small.id)
                slot = rng.randrange(plan.workers)
                target = slots[slot]
                if not target.stalled and rng.random() < plan.stall_share:
                    target.stall()
                    log.stalls += 1
                    duration = rng.uniform(*STALL_S)
                    loop.call_later(duration, target.resume)
                    log.events.append(f"{elapsed:.1f}s stall {slot} for {duration:.1f}s")
                else:
                    target.kill()
                    log.kills += 1
                    slots[slot] = workers.start(name=f"slot{slot}", concurrency=plan.concurrency)
                    log.events.append(f"{elapsed:.1f}s kill {slot}")
            if not state["finished"]:
                pytest.fail(
                    f"every shard of batch {batch.id} is terminal but the batch never finished "
                    f"(seed {plan.seed}): completions were lost or not counted\n"
                    f"{await verify_batch(conn, batch.id)}\n{await app.get_batch(batch.id)}\n"
                    f"events: {log.events}"
                )
            elapsed = time.monotonic() - started
            print(f"batch ended after {elapsed:.1f} s; {log.kills} kills, {log.stalls} stalls")
            print("\n".join(log.events))
            for process in slots:
                process.resume()

            async def callback_done() -> bool:
                return (await verify_batch(conn, batch.id)).callbacks_done >= 1

            await wait_until(callback_done, CALLBACK_WAIT_S, message="the callback never ran")

            async def all_cleaned() -> bool:
                cur = await conn.execute(
                    "SELECT count(*) FROM pgbatch.pruned_batches"
                    " WHERE id = ANY(%s) AND cleaned_at IS NOT NULL",
                    (log.pruned_batches,),
                )
                row = await cur.fetchone()
                return bool(row and row[0] == len(log.pruned_batches))

            await wait_until(all_cleaned, PRUNE_WAIT_S, message="small batches were not pruned")
            for process in slots:
                process.terminate()
            for process in slots:
                await process.wait_exit(WORKER_STOP_S)

            final = await app.get_batch(batch.id)
            await _check_outcome(conn, final, plan.items, Path(workers.env["CHAOS_RUN_LOG"]))
            await _check_pruned(conn, log.pruned_batches, plan.pruned_items, final)
        fenced = sum(p.log_tail(10**9).count("lease lost before completion") for p in slots)
        print(f"zombie completions fenced out (all worker logs): {fenced}")
        assert log.kills >= 3, f"only {log.kills} kills happened: the chaos proved nothing"
    finally:
        await app.close()


async def _shard_report(conn: psycopg.AsyncConnection[Any], batch_id: int) -> str:
    """Describe the shards that are not finished, to diagnose a batch that never ends."""
    cur = await conn.execute(
        """
        SELECT status, count(*), min(attempts), max(attempts) FROM pgbatch.shards
        WHERE batch_id = %(b)s GROUP BY status ORDER BY status
        """,
        {"b": batch_id},
    )
    lines = [f"shards (status, count, min attempts, max attempts): {await cur.fetchall()}"]
    cur = await conn.execute(
        """
        SELECT id, status, attempts, lease_epoch, worker_id,
               round(extract(epoch FROM lease_expires_at - now())::numeric, 1) AS lease_left_s,
               round(extract(epoch FROM run_after - now())::numeric, 1) AS run_after_s,
               last_error
        FROM pgbatch.shards
        WHERE batch_id = %(b)s AND status IN ('queued', 'running')
        ORDER BY id LIMIT 20
        """,
        {"b": batch_id},
    )
    lines += [f"  open shard: {row}" for row in await cur.fetchall()]
    cur = await conn.execute(
        "SELECT pid, state, wait_event_type, wait_event, left(query, 60) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    lines += [f"  session: {row}" for row in await cur.fetchall()]
    return "\n".join(lines)


def _latest_runs(run_log: Path) -> dict[int, int]:
    """Return each shard's latest claimed epoch, from the workers' run logs (chaos_app)."""
    latest: dict[int, int] = {}
    for path in run_log.glob("*.runs"):
        for line in path.read_text().splitlines():
            shard_id, epoch = map(int, line.split())
            latest[shard_id] = max(epoch, latest.get(shard_id, 0))
    return latest


async def _check_outcome(
    conn: psycopg.AsyncConnection[Any], batch: pgbatch.Batch, items: int, run_log: Path
) -> None:
    check = await verify_batch(conn, batch.id)
    print(f"final batch: {batch}\nverification: {check}")
    # Nothing lost, nothing doubled (invariant 4).
    assert check.items == items
    assert check.every_item_has_one_result, check
    assert check.shards_open == 0, check
    # The handler always succeeds and max_attempts is far out of reach: every item is ok.
    assert batch.status is pgbatch.BatchStatus.SUCCEEDED, batch
    assert batch.shards_done == batch.total_shards, batch
    assert (batch.items_ok, batch.items_failed) == (check.results_ok, items - check.results_ok)
    assert check.results_ok == items, check
    # The user's table has no primary key: a shard committed twice would show here.
    rows, distinct_seqs = await _counts(
        conn, "SELECT count(*), count(DISTINCT seq) FROM chaos_rows WHERE batch_id = %s", batch.id
    )
    assert rows == distinct_seqs, f"{rows - distinct_seqs} duplicate user rows"
    assert rows == check.results_ok, (rows, check.results_ok)
    # Fencing (invariant 2): the rows that survive were written under the lease that
    # finished the shard, never by a zombie whose lease had been taken over. The lease that
    # finished a shard is its last claim: the shard's row is gone (done, no failed item),
    # so the last claim comes from the runs the workers logged.
    latest = _latest_runs(run_log)
    cur = await conn.execute(
        "SELECT shard_id, lease_epoch, count(*) FROM chaos_rows WHERE batch_id = %s GROUP BY 1, 2",
        (batch.id,),
    )
    written = await cur.fetchall()
    foreign_epochs = sum(n for shard_id, epoch, n in written if latest.get(shard_id) != epoch)
    assert foreign_epochs == 0, f"{foreign_epochs} rows were committed by a fenced-out lease"
    # Completed exactly once (invariant 3): one callback inserted, run and committed once.
    assert (check.callbacks_inserted, check.callbacks_done) == (1, 1), check
    (callback_rows,) = await _counts(
        conn, "SELECT count(*) FROM chaos_callbacks WHERE batch_id = %s", batch.id
    )
    assert callback_rows == 1


async def _check_pruned(
    conn: psycopg.AsyncConnection[Any], batch_ids: list[int], items: int, big: pgbatch.Batch
) -> None:
    """Check the small batches: each ran to the end, then was pruned whole, with no orphan."""
    assert batch_ids, "no small batch was submitted: retention was not exercised"
    cur = await conn.execute(
        """
        SELECT p.id, p.status, p.total_items, p.pruned_at >= p.finished_at,
               p.pruned_at < %(big_finished)s,
               (SELECT count(*) FROM chaos_callbacks c WHERE c.batch_id = p.id),
               (SELECT count(*) FROM chaos_callbacks c WHERE c.batch_id = p.id
                  AND c.status = 'succeeded' AND c.items_ok = %(items)s AND c.items_failed = 0),
               (SELECT count(*) FROM chaos_rows r WHERE r.batch_id = p.id),
               (SELECT count(DISTINCT r.seq) FROM chaos_rows r WHERE r.batch_id = p.id)
        FROM pgbatch.pruned_batches p WHERE p.id = ANY(%(ids)s) ORDER BY p.id
        """,
        {"ids": batch_ids, "items": items, "big_finished": big.finished_at},
    )
    rows = await cur.fetchall()
    assert [r[0] for r in rows] == sorted(batch_ids), "a small batch has no tombstone"
    for batch_id, status, total, after_end, _, callbacks, complete, user_rows, seqs in rows:
        # Pruned only once final (invariants 3 and 4 held to the end): its callback ran
        # once and saw every item ok, and the handler's rows (the user's table, which
        # pruning leaves alone) are there once each.
        assert (status, total, after_end) == ("succeeded", items, True), batch_id
        assert (callbacks, complete) == (1, 1), (batch_id, callbacks, complete)
        assert user_rows == seqs == items, (batch_id, user_rows, seqs)
    during = sum(1 for r in rows if r[4])
    print(f"small batches pruned: {len(rows)}, {during} of them before the big batch ended")
    assert during > 0, "no batch was pruned while the big batch ran"
    # No orphan in any per-batch table (found in the catalog: a new table is checked too).
    cur = await conn.execute(
        "SELECT table_name FROM information_schema.columns"
        " WHERE table_schema = 'pgbatch' AND column_name = 'batch_id' ORDER BY 1"
    )
    tables = [str(r[0]) for r in await cur.fetchall()]
    assert {"items", "shards", "results", "callbacks"} <= set(tables), tables
    orphans = {}
    for table in tables:
        cur = await conn.execute(
            f"SELECT count(*) FROM pgbatch.{table} t WHERE t.batch_id = ANY(%s)"
            " OR NOT EXISTS (SELECT 1 FROM pgbatch.batches b WHERE b.id = t.batch_id)",
            (batch_ids,),
        )
        row = await cur.fetchone()
        if row and row[0]:
            orphans[table] = int(row[0])
    assert orphans == {}, f"rows left by pruned batches: {orphans}"


async def _counts(conn: psycopg.AsyncConnection[Any], sql: str, batch_id: int) -> tuple[int, ...]:
    cur = await conn.execute(sql, (batch_id,))
    row = await cur.fetchone()
    assert row is not None
    return tuple(int(v) for v in row)


@pytest.mark.asyncio
async def test_killed_and_frozen_workers_lose_and_double_nothing(
    database_url: str, workers: WorkerGroup
) -> None:
    await _run_chaos(database_url, workers, ChaosPlan(items=20_000, deadline_s=120))


@pytest.mark.long
@pytest.mark.timeout(3600)
@pytest.mark.asyncio
async def test_soak_killed_and_frozen_workers(database_url: str, workers: WorkerGroup) -> None:
    plan = ChaosPlan(
        items=int(os.environ.get("PGBATCH_SOAK_ITEMS", "200000")),
        deadline_s=float(os.environ.get("PGBATCH_SOAK_DEADLINE_S", "1800")),
        pause_s=(0.5, 2.0),
    )
    await _run_chaos(database_url, workers, plan)
