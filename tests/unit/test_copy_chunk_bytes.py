"""A COPY chunk of a submit is bounded by bytes as well as by items (issue 10 review)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pgbatch.db import batches
from pgbatch.db.batches import BatchSpec, _chunks, _ItemEncoder

BIG = "x" * 100_000  # an LLM request of 100 KB, as a long prompt makes


def _spec() -> BatchSpec:
    return BatchSpec(task="t", shard_size=1, max_attempts=1, lease_ttl_s=30, max_shard_bytes=10**9)


async def _sizes(items: Any) -> list[int]:
    encoder = _ItemEncoder(1, _spec())
    return [len(chunk) async for chunk in _chunks(items, encoder)]


def test_chunks_of_big_items_stay_under_the_byte_bound() -> None:
    """1,200 items of 100 KB: no chunk past the bound plus one item (was 500 items, 50 MB)."""

    async def stream() -> AsyncIterator[dict[str, Any]]:
        for n in range(1200):
            yield {"n": n, "body": BIG}

    for items in (stream(), [{"n": n, "body": BIG} for n in range(1200)]):
        sizes = asyncio.run(_sizes(items))
        assert sum(sizes) > 1200 * 100_000
        assert max(sizes) <= batches.COPY_CHUNK_BYTES + 101_000, max(sizes)


def test_chunks_of_small_items_keep_the_item_count() -> None:
    """Tiny items still go 500 to a write once the first chunk has measured them."""
    sizes = asyncio.run(_sizes({"n": n} for n in range(5000)))
    encoder_rows = [s // len(b'1\t0\t{"n":0}\n') for s in sizes]
    assert len(sizes) <= 5000 // batches.COPY_CHUNK_ITEMS + 2, encoder_rows
