"""Read back what a batch left in the database, to prove nothing was lost or doubled."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import class_row

from pgbatch.db.queries import query

__all__ = ["BatchVerification", "measure_commit_latency_s", "verify_batch"]


@dataclass(frozen=True, slots=True)
class BatchVerification:
    """Counts that must agree when a batch has ended correctly."""

    items: int
    results: int
    results_ok: int
    items_without_result: int
    shards_open: int
    callbacks_inserted: int
    callbacks_done: int
    # Over the shards still on record: a shard done without failed items leaves no row.
    max_attempts_used: int

    @property
    def every_item_has_one_result(self) -> bool:
        """Tell whether each item has exactly one result (the primary key forbids two)."""
        return self.items_without_result == 0 and self.results == self.items


async def verify_batch(conn: psycopg.AsyncConnection[Any], batch_id: int) -> BatchVerification:
    """Count items, results, open shards and callbacks of the batch."""
    async with conn.cursor(row_factory=class_row(BatchVerification)) as cur:
        await cur.execute(query("verify_batch"), {"batch_id": batch_id})
        row = await cur.fetchone()
    assert row is not None
    return row


async def measure_commit_latency_s(conn: psycopg.AsyncConnection[Any], *, samples: int) -> float:
    """Return the median time of a commit that flushes WAL: the `c` of the sizing formula."""
    timings = []
    for _ in range(samples):  # one commit per sample is the point of the measurement
        started = time.perf_counter()
        async with conn.transaction():
            await conn.execute(query("sizing_probe_commit"))
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)
