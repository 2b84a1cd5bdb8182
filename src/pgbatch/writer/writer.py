"""The writer: concurrent single-item writes turned into group commits, lane by lane."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Sequence
from types import TracebackType
from typing import Generic

import psycopg

from pgbatch.db.database import Database
from pgbatch.engine.group_commit import GroupCommitter, GroupCommitterClosedError, nearest_rank
from pgbatch.writer.errors import WriteFailedError, WriterClosedError
from pgbatch.writer.flush import FlushCounters, write_flush
from pgbatch.writer.models import Key, Payload, WriteItem, WriteOutcome, WriterStats
from pgbatch.writer.sink import Sink

__all__ = ["DEFAULT_LANES", "DEFAULT_MAX_BATCH", "DEFAULT_MAX_DELAY_MS", "Writer"]

# A flush takes at most this many items. It caps one flush's duration and lock hold time:
# t(256) = a + 256·v measured 12-16 ms for documents with two references (docs/writer.md),
# so even a full flush plus the one before it fits the 50 ms p99 budget.
DEFAULT_MAX_BATCH = 256
# The oldest waiting item is flushed after at most this long. 0: a free lane flushes
# whatever waits at once, and items that arrive during a flush form the next one, so
# flushes grow with the load by themselves. Waiting for company only helps at light
# load, where it buys less CPU per item with latency; under load every wait is a pause
# of the lane (2 ms cost 20-25% of the throughput, docs/writer.md).
DEFAULT_MAX_DELAY_MS = 0.0
# Transactions in flight at once, one per lane. Measured with 64 callers on 2 cores
# (docs/writer.md): 3 lanes beat 1 (no overlap of one flush's commit with the next
# one's work) and 4 (each flush then carries so few items that its fixed cost
# dominates). Each lane holds one pooled connection while it flushes; the default pool
# of 6 leaves room for the rest of the process.
DEFAULT_LANES = 3


class Writer(Generic[Key, Payload]):
    """Write single items with group commit: each caller learns its own durable outcome.

    Items are routed by partition to lanes; each lane is a GroupCommitter with at most one
    transaction in flight, flushing when `max_batch` items wait or the oldest has waited
    `max_delay_ms`. A full lane queue makes callers wait (backpressure); `stop` flushes
    everything already accepted.
    """

    def __init__(
        self,
        db: Database,
        sink: Sink[Key, Payload],
        *,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_delay_ms: float = DEFAULT_MAX_DELAY_MS,
        lanes: int = DEFAULT_LANES,
        max_queue: int | None = None,
        name: str = "writer",
    ) -> None:
        if lanes < 1:
            raise ValueError("lanes must be at least 1")
        self._db = db
        self._sink = sink
        self.counters = FlushCounters()
        self.lanes: list[GroupCommitter[WriteItem[Key, Payload], WriteOutcome[Key]]] = [
            GroupCommitter(
                self._flush,
                max_batch=max_batch,
                max_delay_ms=max_delay_ms,
                max_queue=max_queue,
                name=f"{name}-lane-{n}",
            )
            for n in range(lanes)
        ]

    def lane_of(self, partition: str) -> int:
        """Return the lane that serves `partition` (stable across processes)."""
        return zlib.crc32(partition.encode()) % len(self.lanes)

    def start(self) -> None:
        """Start every lane's flusher."""
        for lane in self.lanes:
            lane.start()

    async def stop(self) -> None:
        """Refuse new items, flush everything accepted, then stop."""
        for lane in self.lanes:
            await lane.stop()

    async def __aenter__(self) -> Writer[Key, Payload]:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def write(self, item: WriteItem[Key, Payload]) -> WriteOutcome[Key]:
        """Queue `item`; return its outcome once its flush committed (or was given up).

        Raises WriterClosedError if the writer is stopped, and WriteFailedError when the
        flush failed as a whole for a reason that is no item's fault. A caller cancelled
        while it waits does not withdraw its item: it is written with its flush.
        """
        lane = self.lanes[self.lane_of(item.partition)]
        try:
            return await lane.submit(item)
        except GroupCommitterClosedError as exc:
            raise WriterClosedError(f"{lane.name} is stopped; the item was not queued") from exc
        except psycopg.Error as exc:
            raise WriteFailedError(
                f"the flush holding this item failed ({type(exc).__name__}: {exc}); it may "
                "or may not have committed, and writing it again is safe"
            ) from exc

    @property
    def stats(self) -> WriterStats:
        """Return a snapshot of the counters, summed over the lanes."""
        lanes = [lane.stats for lane in self.lanes]
        sizes: dict[int, int] = {}
        for lane_stats in lanes:
            for size, count in lane_stats.flush_sizes.items():
                sizes[size] = sizes.get(size, 0) + count
        recent: Sequence[float] = list(
            itertools.chain.from_iterable(s.recent_flush_seconds for s in lanes)
        )
        c = self.counters
        return WriterStats(
            lanes=len(self.lanes),
            queue_depth=sum(lane.queue_depth for lane in self.lanes),
            max_queue_depth=max(s.max_queue_depth for s in lanes),
            flushes=sum(s.flushes for s in lanes),
            items=sum(s.items for s in lanes),
            written=c.written,
            rejected=c.rejected,
            conflicts=c.conflicts,
            failed=c.failed,
            retries=c.retries,
            isolations=c.isolations,
            flush_p50_s=nearest_rank(recent, 50),
            flush_p99_s=nearest_rank(recent, 99),
            flush_max_s=max(recent, default=0.0),
            flush_sizes=dict(sorted(sizes.items())),
        )

    async def _flush(self, items: Sequence[WriteItem[Key, Payload]]) -> list[WriteOutcome[Key]]:
        try:
            return await write_flush(self._db, self._sink, items, self.counters)
        except Exception:
            self.counters.failed += len(items)
            raise
