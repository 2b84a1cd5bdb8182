"""Attacks on the block layout (0009): awkward outputs and payloads, retries, paging.

Each test runs the real engine on PostgreSQL and reads back what a user reads: App.results
(the export and the API's stream), the `pgbatch.results` view and the batch's counters.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import pgbatch
from pgbatch.db.results import list_results

# Outputs a JSON array of outputs must keep exactly, position by position.
TRICKY: list[Any] = [
    None,
    [[1, [2, [3]]], []],
    "a,b]c[d",
    '"quoted" \\ back\\slash',
    "ünïcødé ✓ 😀",
    {"k": [None, "]", ","]},
    "",
    0,
    -1.5,
    True,
    "\\u0000 literally",
    "x" * 200_000,
]


async def _drain(app: pgbatch.App, batch_id: int) -> pgbatch.Batch:
    worker = app.worker(concurrency=4)
    running = asyncio.create_task(worker.run())
    try:
        return await app.wait(batch_id, timeout_s=60)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)


async def _results(app: pgbatch.App, batch_id: int, **kw: Any) -> list[tuple[int, Any]]:
    return [
        (seq, o.output if o.ok else ("ERR", o.error))
        async for seq, o in app.results(batch_id, **kw)
    ]


@pytest.mark.asyncio
@pytest.mark.parametrize("shard_size", [1, 7, 1000])
async def test_tricky_outputs_read_back_exactly(app: pgbatch.App, shard_size: int) -> None:
    @app.task(name="tricky")
    async def tricky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(TRICKY[i.value]) for i in items]

    n = len(TRICKY)
    batch = await app.submit("tricky", range(n), shard_size=shard_size)
    done = await _drain(app, batch.id)
    assert (done.items_ok, done.items_failed) == (n, 0)
    assert await _results(app, batch.id) == list(enumerate(TRICKY))
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT seq, ok, output FROM pgbatch.results WHERE batch_id = %s ORDER BY seq",
            (batch.id,),
        )
        assert await cur.fetchall() == [(s, True, v) for s, v in enumerate(TRICKY)]


@pytest.mark.asyncio
async def test_payloads_with_nul_escapes_and_brackets_reach_the_handler(
    app: pgbatch.App,
) -> None:
    payloads: list[Any] = [
        {"s": "nul \u0000 here"},
        "]",
        ["[", ",", '"'],
        None,
        "ünï",
        {"deep": [[[None]]]},
    ]
    seen: dict[int, Any] = {}

    @app.task(name="echo")
    async def echo(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        for item in items:
            seen[item.seq] = item.value
        return [pgbatch.ok(i.value) for i in items]

    batch = await app.submit("echo", payloads, shard_size=4)
    done = await _drain(app, batch.id)
    assert (done.items_ok, done.items_failed) == (len(payloads), 0)
    assert seen == dict(enumerate(payloads))
    assert await _results(app, batch.id) == list(enumerate(payloads))


RUNS: Counter[tuple[int, int]] = Counter()


@pytest.mark.asyncio
@pytest.mark.parametrize("shard_size", [1, 7])
async def test_retry_twice_reruns_only_failed_items(app: pgbatch.App, shard_size: int) -> None:
    runs: Counter[int] = Counter()

    @app.task(name="flaky")
    async def flaky(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        out = []
        for i in items:
            runs[i.seq] += 1
            # seq % 3 == 0 fails on run 1; seq % 6 == 0 also on run 2; all ok on run 3.
            fails = (i.seq % 3 == 0 and runs[i.seq] == 1) or (i.seq % 6 == 0 and runs[i.seq] == 2)
            out.append(pgbatch.error(f"boom {i.seq}") if fails else pgbatch.ok([i.seq, None]))
        return out

    n = 20
    batch = await app.submit("flaky", range(n), shard_size=shard_size, max_attempts=1)
    first = await _drain(app, batch.id)
    fail1 = [s for s in range(n) if s % 3 == 0]
    assert (first.items_ok, first.items_failed) == (n - len(fail1), len(fail1))
    assert [s for s, _ in await _results(app, batch.id, errors_only=True)] == fail1

    await app.retry(batch.id)
    second = await _drain(app, batch.id)
    fail2 = [s for s in range(n) if s % 6 == 0]
    assert (second.items_ok, second.items_failed) == (n - len(fail2), len(fail2))
    assert all(runs[s] == (2 if s % 3 == 0 else 1) for s in range(n))
    assert [s for s, _ in await _results(app, batch.id, errors_only=True)] == fail2

    await app.retry(batch.id)
    third = await _drain(app, batch.id)
    assert (third.items_ok, third.items_failed) == (n, 0)
    assert runs == Counter({s: 1 + (s % 3 == 0) + (s % 6 == 0) for s in range(n)})
    assert await _results(app, batch.id) == [(s, [s, None]) for s in range(n)]
    assert await _results(app, batch.id, errors_only=True) == []


@pytest.mark.asyncio
async def test_paging_from_every_cursor_matches_the_full_listing(app: pgbatch.App) -> None:
    @app.task(name="some_fail")
    async def some_fail(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        return [pgbatch.error("e") if i.seq % 4 == 1 else pgbatch.ok(i.seq) for i in items]

    n = 23
    batch = await app.submit("some_fail", range(n), shard_size=5, max_attempts=1)
    await _drain(app, batch.id)
    full = await _results(app, batch.id)
    assert [s for s, _ in full] == list(range(n))
    async with app.db.connection() as conn:
        for errors_only in (False, True):
            expected = [r for r in full if not errors_only or isinstance(r[1], tuple)]
            for after in range(-1, n + 1):
                for limit in (1, 2, 3, 6, 11):
                    page = await list_results(
                        conn, batch.id, after_seq=after, limit=limit, errors_only=errors_only
                    )
                    want = [r for r in expected if r[0] > after][:limit]
                    got = [(s, o.output if o.ok else ("ERR", o.error)) for s, o in page]
                    assert got == want, (errors_only, after, limit)


@pytest.mark.asyncio
async def test_poison_isolation_of_a_retried_shard_then_retry_again(app: pgbatch.App) -> None:
    state = {"run": 1}
    runs: Counter[int] = Counter()

    @app.task(name="poison")
    async def poison(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        if state["run"] == 2 and any(i.seq in (3, 7) for i in items):
            raise RuntimeError("poison")
        for i in items:
            runs[i.seq] += 1
        if state["run"] == 1:
            return [pgbatch.error("odd") if i.seq % 2 else pgbatch.ok(i.seq) for i in items]
        return [pgbatch.ok(-i.seq) for i in items]

    n = 10
    batch = await app.submit("poison", range(n), shard_size=n, max_attempts=1)
    await _drain(app, batch.id)
    state["run"] = 2
    assert await app.retry(batch.id) == 1
    second = await _drain(app, batch.id)
    assert (second.items_ok, second.items_failed) == (n - 2, 2)
    got = await _results(app, batch.id)
    assert [s for s, _ in got] == list(range(n))
    for seq, value in got:
        if seq in (3, 7):
            assert isinstance(value, tuple) and "poison" in value[1]
        else:
            assert value == (seq if seq % 2 == 0 else -seq)
    state["run"] = 3
    assert await app.retry(batch.id) == 1
    third = await _drain(app, batch.id)
    assert (third.items_ok, third.items_failed) == (n, 0)
    # 3 and 7 raised in run 2 before being counted: every odd item counted twice.
    assert runs == Counter({s: 1 + (s % 2) for s in range(n)})
    assert await _results(app, batch.id) == [(s, s if s % 2 == 0 else -s) for s in range(n)]


@pytest.mark.asyncio
async def test_cancel_while_a_retried_shard_runs(app: pgbatch.App) -> None:
    state = {"run": 1}
    started = asyncio.Event()
    release = asyncio.Event()

    @app.task(name="slow_retry")
    async def slow_retry(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        if state["run"] == 1:
            return [pgbatch.error("odd") if i.seq % 2 else pgbatch.ok(i.seq) for i in items]
        started.set()
        await release.wait()
        return [pgbatch.ok(-i.seq) for i in items]

    n = 12
    batch = await app.submit("slow_retry", range(n), shard_size=4, max_attempts=1)
    await _drain(app, batch.id)
    state["run"] = 2
    assert await app.retry(batch.id) == 3
    worker = app.worker(concurrency=1)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(started.wait(), 30)
        await app.cancel(batch.id)
        release.set()
        final = await app.wait(batch.id, timeout_s=60)
    finally:
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    got = await _results(app, batch.id)
    assert [s for s, _ in got] == list(range(n))
    for seq, value in got:
        if seq % 2 == 0:
            assert value == seq  # the first run's successes are kept
        else:
            assert value == -seq or value == ("ERR", "cancelled")
    ok = sum(1 for _, v in got if not isinstance(v, tuple))
    cancelled = sum(1 for _, v in got if v == ("ERR", "cancelled"))
    assert (final.items_ok, final.items_failed, final.items_cancelled) == (ok, 0, cancelled)
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgbatch.result_errors WHERE batch_id = %s AND retrying",
            (batch.id,),
        )
        assert await cur.fetchone() == (0,)


@pytest.mark.asyncio
@pytest.mark.parametrize("shard_size", [1, 7, 500, 1000, 3000])
async def test_copy_submit_blocks_across_chunks(app: pgbatch.App, shard_size: int) -> None:
    @app.task(name="noop")
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    n = 2503  # a generator over SMALL_BATCH_ITEMS: the COPY path, chunks of up to 500
    values: list[Any] = [
        {"i": i, "s": "\\" * (i % 3) + "],[" + "ü" * (i % 2)} if i % 5 else [i, None]
        for i in range(n)
    ]
    batch = await app.submit("noop", (v for v in values), shard_size=shard_size)
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT first_seq, json_array_length(payloads) FROM pgbatch.item_blocks"
            " WHERE batch_id = %s ORDER BY first_seq",
            (batch.id,),
        )
        blocks = await cur.fetchall()
        assert blocks == [(f, min(shard_size, n - f)) for f in range(0, n, shard_size)]
        cur = await conn.execute(
            "SELECT seq, payload FROM pgbatch.items WHERE batch_id = %s ORDER BY seq",
            (batch.id,),
        )
        assert await cur.fetchall() == list(enumerate(values))


@pytest.mark.asyncio
async def test_rerun_returning_the_wrong_number_of_outcomes_keeps_first_run_outputs(
    app: pgbatch.App,
) -> None:
    state = {"run": 1}

    @app.task(name="short")
    async def short(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        if state["run"] == 1:
            return [pgbatch.error("odd") if i.seq % 2 else pgbatch.ok(i.seq) for i in items]
        if state["run"] == 2:
            return [pgbatch.ok(0) for _ in items[1:]]  # one outcome too few
        return [pgbatch.ok(-i.seq) for i in items] + [pgbatch.ok("extra")]  # one too many

    n = 8
    batch = await app.submit("short", range(n), shard_size=4, max_attempts=1)
    await _drain(app, batch.id)
    for run in (2, 3):
        state["run"] = run
        assert await app.retry(batch.id) == 2
        final = await _drain(app, batch.id)
        assert (final.items_ok, final.items_failed) == (n // 2, n // 2)
        got = await _results(app, batch.id)
        assert [s for s, _ in got] == list(range(n))
        assert [v for s, v in got if s % 2 == 0] == [0, 2, 4, 6]
        assert all(isinstance(v, tuple) for s, v in got if s % 2)
        assert [s for s, _ in await _results(app, batch.id, errors_only=True)] == [1, 3, 5, 7]


@pytest.mark.asyncio
async def test_empty_batches_and_idempotent_resubmit_across_paths(app: pgbatch.App) -> None:
    @app.task(name="noop")
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    for items in ([], (v for v in [])):
        batch = await app.submit("noop", items, shard_size=3)
        assert batch.total_items == 0
        assert await _results(app, batch.id) == []
    values = [{"k": i, "s": "a\\b"} for i in range(10)]
    first, created = await app.submit_or_find(
        "noop", values, shard_size=3, idempotency_key="attack-blocks"
    )
    again, created_again = await app.submit_or_find(
        "noop", (v for v in values), shard_size=3, idempotency_key="attack-blocks"
    )
    assert (created, created_again, again.id) == (True, False, first.id)


@pytest.mark.asyncio
async def test_retry_racing_a_cancel_leaves_one_result_per_item(
    app: pgbatch.App, database_url: str
) -> None:
    from pgbatch.db.verify import verify_batch
    from pgbatch.errors import InvalidStateError
    from tests.conftest import settings_for

    @app.task(name="half")
    async def half(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.error("odd") if i.seq % 2 else pgbatch.ok(i.seq) for i in items]

    other = pgbatch.App(settings=settings_for(database_url))
    await other.open()
    try:
        for _ in range(6):
            n = 9
            batch = await app.submit("half", range(n), shard_size=2, max_attempts=1)
            await _drain(app, batch.id)
            barrier = asyncio.Barrier(2)

            async def retry(barrier: asyncio.Barrier, batch_id: int) -> int | None:
                await barrier.wait()
                try:
                    return await app.retry(batch_id)
                except InvalidStateError:
                    return None  # the cancel won: a cancelled batch is not retried

            async def cancel(barrier: asyncio.Barrier, batch_id: int) -> bool:
                await barrier.wait()
                return await other.cancel(batch_id)

            requeued, cancelled = await asyncio.gather(
                retry(barrier, batch.id), cancel(barrier, batch.id)
            )
            final = await _drain(app, batch.id)
            async with app.db.connection() as conn:
                check = await verify_batch(conn, batch.id)
            assert check.every_item_has_one_result, check
            got = await _results(app, batch.id)
            assert [s for s, _ in got] == list(range(n))
            assert [v for s, v in got if s % 2 == 0] == [0, 2, 4, 6, 8]
            odd = [v for s, v in got if s % 2]
            if cancelled:
                assert requeued == 4 and final.status == "cancelled"
                assert odd == [("ERR", "cancelled")] * 4 or all(
                    v in (("ERR", "cancelled"), ("ERR", "odd")) for v in odd
                )
            else:
                assert odd == [("ERR", "odd")] * 4
            assert final.items_ok + final.items_failed + final.items_cancelled == n, final
    finally:
        await other.close()


@pytest.mark.asyncio
async def test_a_buried_short_last_shard_then_batch_retry(app: pgbatch.App) -> None:
    from pgbatch.db.shards import bury_shard

    @app.task(name="neg")
    async def neg(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(-i.value) for i in items]

    n = 10  # shards of 4: the last one (seqs 8, 9) is short
    batch = await app.submit("neg", range(n), shard_size=4, max_attempts=1)
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT id FROM pgbatch.shards WHERE batch_id = %s ORDER BY shard_no", (batch.id,)
        )
        ids = [row[0] for row in await cur.fetchall()]
        async with conn.transaction():
            assert await bury_shard(conn, ids[-1], error="unreadable")
    buried = await _drain(app, batch.id)
    assert (buried.items_ok, buried.items_failed, buried.shards_dead) == (8, 2, 1)
    assert await _results(app, batch.id, errors_only=True) == [
        (8, ("ERR", "unreadable")),
        (9, ("ERR", "unreadable")),
    ]
    assert await app.retry(batch.id) == 1
    final = await _drain(app, batch.id)
    assert (final.items_ok, final.items_failed, final.shards_dead) == (n, 0, 0)
    assert await _results(app, batch.id) == [(s, -s) for s in range(n)]


@pytest.mark.asyncio
async def test_results_read_during_a_rerun_omit_the_items_being_retried(
    app: pgbatch.App,
) -> None:
    from pgbatch.db.verify import verify_batch

    state = {"run": 1}
    started = asyncio.Event()
    release = asyncio.Event()

    @app.task(name="held")
    async def held(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        if state["run"] == 1:
            return [pgbatch.error("odd") if i.seq % 2 else pgbatch.ok(i.seq) for i in items]
        started.set()
        await release.wait()
        return [pgbatch.ok(-i.seq) for i in items]

    n = 8
    batch = await app.submit("held", range(n), shard_size=n, max_attempts=1)
    await _drain(app, batch.id)
    state["run"] = 2
    assert await app.retry(batch.id) == 1
    worker = app.worker(concurrency=1)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(started.wait(), 30)
        # The rerun holds the odd items: they have no result until it ends.
        assert await _results(app, batch.id) == [(s, s) for s in range(0, n, 2)]
        assert await _results(app, batch.id, errors_only=True) == []
        async with app.db.connection() as conn:
            cur = await conn.execute(
                "SELECT seq FROM pgbatch.results WHERE batch_id = %s ORDER BY seq", (batch.id,)
            )
            assert [row[0] for row in await cur.fetchall()] == [0, 2, 4, 6]
            check = await verify_batch(conn, batch.id)
            assert (check.items, check.results, check.items_without_result) == (8, 4, 4)
        release.set()
        final = await app.wait(batch.id, timeout_s=60)
    finally:
        release.set()
        worker.request_stop()
        await asyncio.wait_for(running, 30)
    assert (final.items_ok, final.items_failed) == (n, 0)
    assert await _results(app, batch.id) == [(s, s if s % 2 == 0 else -s) for s in range(n)]


@pytest.mark.asyncio
async def test_paging_skips_retrying_items_from_every_cursor(app: pgbatch.App) -> None:
    @app.task(name="sparse_fail")
    async def sparse_fail(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        return [pgbatch.error("e") if i.seq in (4, 5, 9, 13) else pgbatch.ok(i.seq) for i in items]

    n = 16  # shards of 3: 0-2 ok, 3-5 two failures, 6-8 ok, 9-11 one, 12-14 one, 15 short
    batch = await app.submit("sparse_fail", range(n), shard_size=3, max_attempts=1)
    await _drain(app, batch.id)
    assert await app.retry(batch.id) == 3  # nobody runs the rerun: those items are retrying
    expected = [(s, s) for s in range(n) if s not in (4, 5, 9, 13)]
    assert await _results(app, batch.id) == expected
    async with app.db.connection() as conn:
        for after in range(-1, n + 1):
            for limit in (1, 2, 4, 7):
                page = await list_results(conn, batch.id, after_seq=after, limit=limit)
                want = [r for r in expected if r[0] > after][:limit]
                assert [(s, o.output) for s, o in page] == want, (after, limit)
                errors = await list_results(
                    conn, batch.id, after_seq=after, limit=limit, errors_only=True
                )
                assert errors == []
