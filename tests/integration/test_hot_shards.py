"""A shard that ends done with no failed item is deleted by its fenced completion (issue 13).

The fence stays as strong as the update it replaces: only a shard still running under the
claimed epoch goes; a zombie (its lease expired and was taken over) deletes nothing, counts
nothing, writes nothing, whether it completes before, during or after its successor; a
heartbeat of a deleted shard says 'lost'. Shards that end otherwise keep their row, so a
retry still reruns only the failed items. Readers count finished shards from the batch
row, and accept the done rows an earlier release kept.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.shards import (
    ShardCompletion,
    claim_shards,
    complete_shards,
    heartbeat_shards,
    rescue_expired_shards,
)
from pgbatch.db.verify import verify_batch
from pgbatch.models import ClaimedShard, ShardStatus, TableRows
from tests.helpers import register_noop

ROWS = "SELECT id, status FROM pgbatch.shards WHERE batch_id = %s ORDER BY id"
WRITERS = "SELECT writer, count(*) FROM side_effects GROUP BY 1 ORDER BY 1"


def _done(shard: ClaimedShard, writer: str, *, failing: frozenset[int] = frozenset()) -> Any:
    outcomes = [
        (i.seq, pgbatch.error("bad") if i.seq in failing else pgbatch.ok(writer))
        for i in shard.items
    ]
    return ShardCompletion.build(
        shard.id,
        shard.batch_id,
        shard.lease_epoch,
        ShardStatus.DONE,
        outcomes,
        [TableRows("side_effects", ("seq", "writer"), [(i.seq, writer) for i in shard.items])],
    )


async def _claim(app: pgbatch.App, worker: str, limit: int = 1) -> list[ClaimedShard]:
    async with app.db.connection() as conn:
        return await claim_shards(
            conn, worker_id=worker, queues=["default"], tasks=["t"], limit=limit
        )


async def _take_over(app: pgbatch.App, limit: int) -> tuple[list[ClaimedShard], list[ClaimedShard]]:
    """Claim as the zombie, let its leases lapse and be rescued, claim again as the holder."""
    zombies = await _claim(app, "zombie", limit)
    async with app.db.connection() as conn:
        await conn.execute(
            "UPDATE pgbatch.shards SET lease_expires_at = now() - interval '1 second'"
            " WHERE status = 'running'"
        )
        assert await rescue_expired_shards(conn) == len(zombies)
    holders = await _claim(app, "holder", limit)
    assert sorted(h.id for h in holders) == sorted(z.id for z in zombies)
    return sorted(zombies, key=lambda s: s.id), sorted(holders, key=lambda s: s.id)


async def _rows(app: pgbatch.App, sql: str, *params: Any) -> list[Any]:
    async with app.db.connection() as conn:
        return await (await conn.execute(sql, params or None)).fetchall()


async def _side_effects(app: pgbatch.App) -> None:
    async with app.db.connection() as conn:
        await conn.execute("CREATE TABLE side_effects (seq bigint, writer text)")


@pytest.mark.asyncio
async def test_a_clean_done_shard_is_deleted_and_other_endings_keep_their_row(
    app: pgbatch.App,
) -> None:
    register_noop(app)
    await _side_effects(app)
    batch = await app.submit("t", range(3), shard_size=1)
    clean, failed, retried = await _claim(app, "w", 3)
    async with app.db.connection() as conn, conn.transaction():
        report = await complete_shards(
            conn,
            [
                _done(clean, "w"),
                _done(failed, "w", failing=frozenset({failed.items[0].seq})),
                ShardCompletion.retry(
                    retried.id, retried.batch_id, retried.lease_epoch, delay_s=0, error="again"
                ),
            ],
        )
    assert len(report.accepted) == 3
    assert await _rows(app, ROWS, batch.id) == [(failed.id, "done"), (retried.id, "queued")]
    progress = await app.get_batch(batch.id)
    assert (progress.shards_done, progress.items_ok, progress.items_failed) == (2, 1, 1)
    _, insight = await app.insight(batch.id)
    assert insight.shard_states == {"done": 2, "queued": 1}
    assert sum(items for _, items in insight.throughput) == 2


@pytest.mark.asyncio
async def test_a_zombie_completing_after_the_holder_deleted_the_shard_counts_nothing(
    app: pgbatch.App,
) -> None:
    register_noop(app)
    await _side_effects(app)
    batch = await app.submit("t", range(4), shard_size=2)
    zombies, holders = await _take_over(app, 2)
    async with app.db.connection() as conn, conn.transaction():
        report = await complete_shards(conn, [_done(h, "holder") for h in holders])
    assert report.finished_batches == [batch.id]
    assert await _rows(app, ROWS, batch.id) == []  # both deleted

    # The zombie wakes up and flushes: no row to lock, nothing accepted, written or counted.
    before = await app.get_batch(batch.id)
    async with app.db.connection() as conn, conn.transaction():
        late = await complete_shards(conn, [_done(z, "zombie") for z in zombies])
    assert (late.accepted, late.finished_batches, late.callbacks_inserted) == (set(), [], [])
    after = await app.get_batch(batch.id)
    assert (after.shards_done, after.items_ok, after.version) == (2, 4, before.version)
    assert await _rows(app, WRITERS) == [("holder", 4)]
    outputs = [(seq, o.output) async for seq, o in app.results(batch.id)]
    assert outputs == [(seq, "holder") for seq in range(4)]


@pytest.mark.asyncio
async def test_a_zombie_blocked_on_the_row_the_holder_deletes_matches_nothing(
    app: pgbatch.App, database_url: str
) -> None:
    """The zombie flushes while the holder's delete is not committed yet.

    The zombie's epoch is no longer the row's, so its flush does not even wait for the
    holder's lock (it locks only a shard still running under its epoch): it matches
    nothing, before and after the holder commits.
    """
    register_noop(app)
    await _side_effects(app)
    batch = await app.submit("t", range(1), shard_size=1)
    [zombie], [holder] = await _take_over(app, 1)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as holder_conn,
        await psycopg.AsyncConnection.connect(database_url) as zombie_conn,
    ):
        await complete_shards(holder_conn, [_done(holder, "holder")])  # open transaction
        late = await asyncio.wait_for(complete_shards(zombie_conn, [_done(zombie, "zombie")]), 10)
        await holder_conn.commit()
        await zombie_conn.commit()
    assert late.accepted == set()
    final = await app.get_batch(batch.id)
    assert (final.shards_done, final.items_ok, final.status) == (1, 1, "succeeded")
    assert await _rows(app, WRITERS) == [("holder", 1)]
    assert await _rows(app, ROWS, batch.id) == []


@pytest.mark.asyncio
async def test_a_zombies_clean_completion_does_not_delete_the_holders_running_shard(
    app: pgbatch.App,
) -> None:
    register_noop(app)
    await _side_effects(app)
    batch = await app.submit("t", range(3), shard_size=1)
    zombies, holders = await _take_over(app, 3)
    async with app.db.connection() as conn, conn.transaction():
        late = await complete_shards(conn, [_done(z, "zombie") for z in zombies])
    assert late.accepted == set()
    assert await _rows(app, ROWS, batch.id) == [(h.id, "running") for h in holders]
    async with app.db.connection() as conn:
        beat = await heartbeat_shards(conn, [(h.id, h.lease_epoch) for h in holders])
    assert set(beat.renewed) == {h.id for h in holders}
    assert (await app.get_batch(batch.id)).shards_done == 0


@pytest.mark.asyncio
async def test_zombies_and_holders_completing_at_once_count_each_shard_once(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    await _side_effects(app)
    total = 60
    batch = await app.submit("t", range(total), shard_size=1, on_complete="cb")
    zombies, holders = await _take_over(app, total)
    # Every zombie and every holder flushes its shard on its own connection, released
    # together, so some zombies reach a row before its holder deletes it, others after.
    completions = [_done(z, "zombie") for z in zombies] + [_done(h, "holder") for h in holders]
    connections = 12
    conns = [await psycopg.AsyncConnection.connect(database_url) for _ in range(connections)]
    barrier = asyncio.Barrier(connections)

    async def flusher(index: int) -> list[set[tuple[int, int]]]:
        conn = conns[index]
        await barrier.wait()
        accepted = []
        for completion in completions[index::connections]:
            async with conn.transaction():
                accepted.append((await complete_shards(conn, [completion])).accepted)
        return accepted

    try:
        results = await asyncio.gather(*map(flusher, range(connections)))
    finally:
        for conn in conns:
            await conn.close()
    accepted = set().union(*(a for r in results for a in r))
    assert accepted == {(h.id, h.lease_epoch) for h in holders}
    final = await app.get_batch(batch.id)
    assert (final.shards_done, final.items_ok, final.status) == (total, total, "succeeded")
    assert await _rows(app, WRITERS) == [("holder", total)]
    assert await _rows(app, ROWS, batch.id) == []
    callbacks = "SELECT count(*) FROM pgbatch.callbacks WHERE batch_id = %s"
    assert await _rows(app, callbacks, batch.id) == [(1,)]


@pytest.mark.asyncio
async def test_a_heartbeat_of_a_deleted_shard_is_lost(app: pgbatch.App) -> None:
    register_noop(app)
    await _side_effects(app)
    await app.submit("t", range(2), shard_size=1)
    zombies, holders = await _take_over(app, 2)
    async with app.db.connection() as conn, conn.transaction():
        await complete_shards(conn, [_done(h, "holder") for h in holders[:1]])
    async with app.db.connection() as conn:
        held = await heartbeat_shards(conn, [(h.id, h.lease_epoch) for h in holders])
        stale = await heartbeat_shards(conn, [(z.id, z.lease_epoch) for z in zombies])
    # The holder of the deleted shard has lost it; the other holder renews its lease.
    assert (held.lost, set(held.renewed), held.busy) == ({holders[0].id}, {holders[1].id}, set())
    # Both zombies have lost: the shard deleted under them as the one taken over.
    assert (stale.lost, stale.renewed, stale.busy) == ({z.id for z in zombies}, {}, set())


@pytest.mark.asyncio
async def test_cancel_racing_completions_ends_every_item_once(
    app: pgbatch.App, database_url: str
) -> None:
    register_noop(app)
    await _side_effects(app)
    total = 40
    batch = await app.submit("t", range(total), shard_size=1)
    running = await _claim(app, "w", total // 2)
    connections = 8
    conns = [await psycopg.AsyncConnection.connect(database_url) for _ in range(connections)]
    barrier = asyncio.Barrier(connections + 1)

    async def flusher(index: int) -> None:
        conn = conns[index]
        await barrier.wait()
        for shard in running[index::connections]:
            async with conn.transaction():
                await complete_shards(conn, [_done(shard, "w")])

    async def cancel() -> bool:
        await barrier.wait()
        return await app.cancel(batch.id)

    try:
        *_, cancelled = await asyncio.gather(*map(flusher, range(connections)), cancel())
    finally:
        for conn in conns:
            await conn.close()
    assert cancelled
    final = await app.get_batch(batch.id)
    assert final.status == "cancelled" and final.shards_done == total
    assert (final.items_ok, final.items_cancelled) == (total // 2, total // 2)
    # The done shards are gone, the cancelled ones kept; the states add up from counters.
    kept = await _rows(app, ROWS, batch.id)
    assert {status for _, status in kept} == {"cancelled"} and len(kept) == total // 2
    assert not {shard_id for shard_id, _ in kept} & {r.id for r in running}
    _, insight = await app.insight(batch.id)
    assert insight.shard_states == {"done": total // 2, "cancelled": total // 2}
    assert sum(items for _, items in insight.throughput) == total // 2
    async with app.db.connection() as conn:
        assert (await verify_batch(conn, batch.id)).every_item_has_one_result


@pytest.mark.asyncio
async def test_retry_reruns_only_failed_items_and_resurrects_no_clean_shard(
    app: pgbatch.App,
) -> None:
    ran: list[int] = []
    failed_once: set[int] = set()

    @app.task(name="t")  # multiples of 5 fail on their first run
    async def flaky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        out = []
        for item in items:
            ran.append(item.seq)
            if item.seq % 5 == 0 and item.seq not in failed_once:
                failed_once.add(item.seq)
                out.append(pgbatch.error("first run"))
            else:
                out.append(pgbatch.ok(item.seq))
        return out

    total = 40
    batch = await app.submit("t", range(total), shard_size=2)

    async def drain() -> pgbatch.Batch:
        worker = app.worker(concurrency=4)
        task = asyncio.create_task(worker.run())
        try:
            return await app.wait(batch.id, timeout_s=30)
        finally:
            worker.request_stop()
            await asyncio.wait_for(task, 30)

    first = await drain()
    assert (first.items_ok, first.items_failed) == (total - 8, 8)
    failing_shards = {seq // 2 for seq in range(0, total, 5)}
    # Only the shards holding a failed item are on record.
    kept = await _rows(
        app, "SELECT shard_no, status FROM pgbatch.shards WHERE batch_id = %s ORDER BY 1", batch.id
    )
    assert kept == [(n, "done") for n in sorted(failing_shards)]
    assert sorted(ran) == list(range(total))

    ran.clear()
    assert await app.retry(batch.id) == len(failing_shards)
    second = await drain()
    assert sorted(ran) == list(range(0, total, 5))  # the failed items, nothing else
    assert (second.status, second.items_ok, second.items_failed) == ("succeeded", total, 0)
    assert second.shards_done == second.total_shards == total // 2
    assert await _rows(app, ROWS, batch.id) == []  # rerun clean: deleted in turn
    outputs = [(seq, o.ok, o.output) async for seq, o in app.results(batch.id)]
    assert outputs == [(seq, True, seq) for seq in range(total)]
    _, insight = await app.insight(batch.id)
    assert insight.shard_states == {"done": total // 2}
    async with app.db.connection() as conn:
        assert (await verify_batch(conn, batch.id)).every_item_has_one_result


@pytest.mark.asyncio
async def test_readers_accept_the_done_rows_an_earlier_release_kept(app: pgbatch.App) -> None:
    """Rows of done shards and result blocks with no time, as written before 0011."""
    register_noop(app)
    await _side_effects(app)
    batch = await app.submit("t", range(6), shard_size=2)
    shards = await _claim(app, "w", 3)
    async with app.db.connection() as conn, conn.transaction():
        await complete_shards(conn, [_done(s, "w") for s in shards[:2]])
    async with app.db.connection() as conn:
        # What the previous release left: a done row per finished shard, blocks with no time.
        await conn.execute(
            "INSERT INTO pgbatch.shards (batch_id, tenant, shard_no, first_seq, last_seq, task,"
            " queue, priority, max_attempts, lease_ttl_s, status, attempts, lease_epoch,"
            " finished_at, worker_id)"
            " SELECT b.id, b.tenant, r.first_seq / 2, r.first_seq, r.first_seq + 1, b.task,"
            " b.queue, b.priority, b.max_attempts, b.lease_ttl_s, 'done', 1, 1, now(), 'old'"
            " FROM pgbatch.result_blocks r JOIN pgbatch.batches b ON b.id = r.batch_id"
            " WHERE b.id = %s",
            (batch.id,),
        )
        await conn.execute(
            "UPDATE pgbatch.result_blocks SET finished_at = NULL WHERE batch_id = %s", (batch.id,)
        )
    _, insight = await app.insight(batch.id)
    assert insight.shard_states == {"done": 2, "running": 1}
    assert sum(items for _, items in insight.throughput) == 4
    # The old clean rows are not retried; the last shard still completes (and is deleted).
    async with app.db.connection() as conn, conn.transaction():
        await complete_shards(conn, [_done(shards[2], "w")])
    final = await app.get_batch(batch.id)
    assert (final.status, final.shards_done, final.items_ok) == ("succeeded", 3, 6)
    assert await app.retry(batch.id) == 0
    _, insight = await app.insight(batch.id)
    assert insight.shard_states == {"done": 3}
    assert sum(items for _, items in insight.throughput) == 6
