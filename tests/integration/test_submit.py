"""Submit: items streamed with COPY, shards set-based, idempotency, bad input writes nothing."""

from __future__ import annotations

import asyncio
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

import pgbatch
from pgbatch.limits import MAX_LEASE_TTL_S, MAX_MAX_ATTEMPTS, MAX_SHARD_SIZE, MIN_LEASE_TTL_S
from tests.conftest import settings_for
from tests.helpers import register_noop

COUNT_ROWS = """
SELECT (SELECT count(*) FROM pgbatch.batches), (SELECT count(*) FROM pgbatch.items),
       (SELECT count(*) FROM pgbatch.shards), (SELECT count(*) FROM pgbatch.callbacks)
"""


async def _counts(app: pgbatch.App) -> tuple[int, ...]:
    async with app.db.connection() as conn:
        row = await (await conn.execute(COUNT_ROWS)).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.asyncio
async def test_items_and_shard_ranges(app: pgbatch.App) -> None:
    register_noop(app)

    async def items() -> AsyncIterator[dict[str, Any]]:
        for n in range(10):
            yield {"n": n, "text": 'tab\there \\ and "quotes" and é'}

    batch = await app.submit("t", items(), shard_size=3)
    assert (batch.total_items, batch.total_shards, batch.status) == (10, 4, "pending")
    async with app.db.connection() as conn:
        shards = await (
            await conn.execute(
                "SELECT shard_no, first_seq, last_seq FROM pgbatch.shards ORDER BY shard_no"
            )
        ).fetchall()
        payload = await (
            await conn.execute("SELECT payload FROM pgbatch.items WHERE seq = 9")
        ).fetchone()
    assert shards == [(0, 0, 2), (1, 3, 5), (2, 6, 8), (3, 9, 9)]
    assert payload == ({"n": 9, "text": 'tab\there \\ and "quotes" and é'},)


@pytest.mark.asyncio
async def test_idempotency_same_payload_same_batch_different_payload_conflict(
    app: pgbatch.App,
) -> None:
    register_noop(app)
    first = await app.submit("t", range(50), idempotency_key="nightly")
    again = await app.submit("t", iter(range(50)), idempotency_key="nightly")
    assert again.id == first.id
    with pytest.raises(pgbatch.IdempotencyConflictError, match="different payload"):
        await app.submit("t", range(51), idempotency_key="nightly")
    with pytest.raises(pgbatch.IdempotencyConflictError):
        await app.submit("t", range(50), idempotency_key="nightly", shard_size=7)
    assert await _counts(app) == (1, 50, 1, 0)


@pytest.mark.asyncio
async def test_short_lists_take_one_statement_and_match_the_copy_path(app: pgbatch.App) -> None:
    register_noop(app)
    items = [{"n": n, "s": "back\\slash"} for n in range(25)]
    small = await app.submit("t", items, shard_size=10, idempotency_key="k")
    # The same items streamed through COPY hash the same: one payload, one batch.
    streamed = await app.submit("t", iter(items), shard_size=10, idempotency_key="k")
    assert streamed.id == small.id and (small.total_items, small.total_shards) == (25, 3)
    with pytest.raises(pgbatch.IdempotencyConflictError):
        await app.submit("t", items[:-1], shard_size=10, idempotency_key="k")
    big = await app.submit("t", iter(items), shard_size=10)
    async with app.db.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT batch_id, seq, payload::text FROM pgbatch.items ORDER BY batch_id, seq"
            )
        ).fetchall()
        shards = await (
            await conn.execute(
                "SELECT batch_id, first_seq, last_seq FROM pgbatch.shards ORDER BY 1, 2"
            )
        ).fetchall()
    by_batch = {b: [(seq, text) for bid, seq, text in rows if bid == b] for b in (small.id, big.id)}
    assert by_batch[small.id] == by_batch[big.id]
    assert [s[1:] for s in shards if s[0] == small.id] == [(0, 9), (10, 19), (20, 24)]
    assert await _counts(app) == (2, 50, 6, 0)


@pytest.mark.asyncio
async def test_concurrent_submissions_with_one_key_make_one_batch(app: pgbatch.App) -> None:
    register_noop(app)
    others = [pgbatch.App(settings=app.settings) for _ in range(6)]
    for other in others:
        register_noop(other)
        await other.open()
    barrier = asyncio.Barrier(len(others))

    async def submit(other: pgbatch.App) -> int:
        await barrier.wait()
        return (await other.submit("t", range(1000), idempotency_key="once")).id

    try:
        ids = await asyncio.gather(*(submit(o) for o in others))
    finally:
        for other in others:
            await other.close()
    assert len(set(ids)) == 1
    assert await _counts(app) == (1, 1000, 10, 0)


@pytest.mark.asyncio
async def test_empty_batch_completes_at_once_with_its_callback(app: pgbatch.App) -> None:
    register_noop(app)
    batch = await app.submit("t", [], on_complete="cb")
    assert (batch.status, batch.total_shards, batch.finished_at is not None) == (
        "succeeded", 0, True,
    )  # fmt: skip
    assert await _counts(app) == (1, 0, 0, 1)


def _bad_items() -> Iterator[Any]:
    yield from range(5000)
    yield {"not": object()}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("kwargs", "error", "field"),
    [
        ({"task": "nope"}, pgbatch.UnknownTaskError, "task"),
        ({"shard_size": 0}, pgbatch.InvalidBatchError, "shard_size"),
        ({"shard_size": -3}, pgbatch.InvalidBatchError, "shard_size"),
        ({"shard_size": "10"}, pgbatch.InvalidBatchError, "shard_size"),
        ({"shard_size": True}, pgbatch.InvalidBatchError, "shard_size"),
        ({"max_attempts": 0}, pgbatch.InvalidBatchError, "max_attempts"),
        ({"lease_ttl_s": 0}, pgbatch.InvalidBatchError, "lease_ttl_s"),
        # Issue 9: a lease no heartbeat can renew killed every shard of a healthy handler.
        ({"lease_ttl_s": 1e-6}, pgbatch.InvalidBatchError, "lease_ttl_s"),
        ({"lease_ttl_s": MIN_LEASE_TTL_S / 2}, pgbatch.InvalidBatchError, "lease_ttl_s"),
        ({"lease_ttl_s": MAX_LEASE_TTL_S * 2}, pgbatch.InvalidBatchError, "lease_ttl_s"),
        ({"lease_ttl_s": float("nan")}, pgbatch.InvalidBatchError, "lease_ttl_s"),
        ({"max_attempts": MAX_MAX_ATTEMPTS + 1}, pgbatch.InvalidBatchError, "max_attempts"),
        ({"shard_size": MAX_SHARD_SIZE + 1}, pgbatch.InvalidBatchError, "shard_size"),
        ({"on_complete": "nope"}, pgbatch.InvalidBatchError, "on_complete"),
        ({"idempotency_key": ""}, pgbatch.InvalidBatchError, "idempotency_key"),
        ({"items": "abc"}, pgbatch.InvalidBatchError, "items"),
        ({"items": {"a": 1}}, pgbatch.InvalidBatchError, "items"),
        ({"items": 5}, pgbatch.InvalidBatchError, "items"),
        ({"items": _bad_items()}, pgbatch.ItemNotSerializableError, "items"),
    ],
)
async def test_bad_input_is_a_clear_error_and_writes_nothing(
    app: pgbatch.App, kwargs: dict[str, Any], error: type[Exception], field: str
) -> None:
    register_noop(app)
    arguments: dict[str, Any] = {"task": "t", "items": range(10), **kwargs}
    with pytest.raises(error) as raised:
        await app.submit(arguments.pop("task"), arguments.pop("items"), **arguments)
    assert getattr(raised.value, "field", None) == field
    assert await _counts(app) == (0, 0, 0, 0)


@pytest.mark.asyncio
async def test_any_json_string_round_trips_even_with_nul(app: pgbatch.App) -> None:
    register_noop(app)
    batch = await app.submit("t", ["a\x00b", {"k": "\\ \t é"}])
    async with app.db.connection() as conn:
        rows = await (
            await conn.execute(
                "SELECT payload FROM pgbatch.items WHERE batch_id = %s ORDER BY seq", (batch.id,)
            )
        ).fetchall()
    assert rows == [("a\x00b",), ({"k": "\\ \t é"},)]


@pytest.mark.asyncio
async def test_a_non_serialisable_item_is_named_by_position(app: pgbatch.App) -> None:
    register_noop(app)
    with pytest.raises(pgbatch.ItemNotSerializableError, match="item 5000") as raised:
        await app.submit("t", _bad_items())
    assert raised.value.seq == 5000


@pytest.mark.asyncio
async def test_submit_streams_without_holding_the_items(app: pgbatch.App) -> None:
    register_noop(app)
    count = 100_000

    def items() -> Iterator[dict[str, Any]]:
        for n in range(count):
            yield {"prompt": f"item {n} " + "x" * 100}

    tracemalloc.start()
    try:
        batch = await app.submit("t", items(), shard_size=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert batch.total_items == count
    # ~12 MB of item payloads went through; a streaming submit keeps a chunk at a time.
    assert peak < 8 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


@pytest.mark.asyncio
@pytest.mark.parametrize("streamed", [False, True], ids=["list", "generator-copy"])
async def test_a_shard_over_max_shard_bytes_is_refused_and_writes_nothing(
    database_url: str, streamed: bool
) -> None:
    # Issue 9: a shard whose items the claim cannot read as one value wedged the queue.
    # 2,000 items of ~200 bytes; shards of 10 are ~2 KB, one shard of 50 fat items is not.
    limit = 4096
    app = pgbatch.App(settings=settings_for(database_url, max_shard_bytes=limit))
    register_noop(app)
    await app.open()
    try:

        def items() -> Iterator[Any]:
            for n in range(2000):
                yield {"n": n, "pad": "x" * (2000 if 1500 <= n < 1502 else 180)}

        # 1,000 items in a list take the one-statement path; the generator takes COPY.
        source: Any = items() if streamed else [*list(items())[:990], *list(items())[1500:1510]]
        with pytest.raises(pgbatch.ShardTooLargeError) as raised:
            await app.submit("t", source, shard_size=10)
        assert isinstance(raised.value, pgbatch.InvalidBatchError)
        assert raised.value.field == "items"
        assert raised.value.limit_bytes == limit
        assert str(limit) in str(raised.value) and "PGBATCH_MAX_SHARD_BYTES" in str(raised.value)
        assert raised.value.shard_no == (150 if streamed else 99)
        assert await _counts(app) == (0, 0, 0, 0)
        # The same items in shards that fit are accepted; a shard exactly at the bound too.
        batch = await app.submit("t", items(), shard_size=2)
        assert batch.total_items == 2000
        exact = limit - 1  # one payload plus its comma
        body = "y" * (exact - len(b'""'))
        assert (await app.submit("t", [body], shard_size=1)).total_items == 1
        with pytest.raises(pgbatch.ShardTooLargeError):
            await app.submit("t", [body + "y"], shard_size=1)
    finally:
        await app.close()
