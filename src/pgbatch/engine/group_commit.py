"""Gather concurrent writes and commit them together: one transaction, many callers.

A caller `submit`s an item and waits; a single flusher takes up to `max_batch` waiting
items (or whatever arrived within `max_delay_ms` of the first), hands them to the flush
function as one list, and resolves each caller with its own result after the commit.
The completer of shard completions and the single-item writer share this machinery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = [
    "GroupCommitStats",
    "GroupCommitter",
    "GroupCommitterClosedError",
    "isolate_failures",
    "nearest_rank",
]

T = TypeVar("T")
R = TypeVar("R")

_log = logging.getLogger(__name__)

# Flush latencies kept for percentiles: enough for a stable p99, small enough to copy on read.
RECENT_FLUSHES = 2048

FlushFn = Callable[[Sequence[T]], Awaitable[Sequence["R | BaseException"]]]


class GroupCommitterClosedError(RuntimeError):
    """The committer is stopped; it accepts nothing more."""


@dataclass(slots=True)
class GroupCommitStats:
    """Counters of a committer, cheap to read at any time."""

    flushes: int = 0
    items: int = 0
    failed_flushes: int = 0
    flush_seconds_total: float = 0.0
    last_flush_seconds: float = 0.0
    max_flush_size: int = 0
    # flush size → number of flushes of that size, for the size distribution
    flush_sizes: dict[int, int] = field(default_factory=dict)
    # the most submissions ever seen waiting at once (the queue's high-water mark)
    max_queue_depth: int = 0
    # durations of the latest flushes, for latency percentiles
    recent_flush_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_FLUSHES))

    @property
    def mean_flush_size(self) -> float:
        """Return the mean number of items per flush."""
        return self.items / self.flushes if self.flushes else 0.0

    def flush_seconds_percentile(self, q: float) -> float:
        """Return the q-th percentile (0..100) of the recent flush durations (0 if none)."""
        return nearest_rank(self.recent_flush_seconds, q)


def nearest_rank(values: Iterable[float], q: float) -> float:
    """Return the q-th percentile (0..100) of `values` by nearest rank, 0.0 if there are none."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


async def isolate_failures(
    items: Sequence[T],
    attempt: Callable[[Sequence[T]], Awaitable[object]],
    is_item_error: Callable[[Exception], bool],
) -> list[tuple[T, Exception]]:
    """Write `items` with `attempt`, bisecting on item errors; return the items that fail alone.

    `attempt` must be all-or-nothing (run it in a savepoint): a failed attempt leaves no
    trace and a successful one stays, so later halves see what earlier halves wrote. Errors
    that `is_item_error` does not recognise propagate. With k bad items among n this takes
    about 2·k·log2(n) attempts instead of n.
    """
    try:
        await attempt(items)
        return []
    except Exception as exc:
        if not is_item_error(exc):
            raise
        if len(items) <= 1:
            return [(item, exc) for item in items]
    middle = len(items) // 2
    failed = await isolate_failures(items[:middle], attempt, is_item_error)
    return failed + await isolate_failures(items[middle:], attempt, is_item_error)


class GroupCommitter(Generic[T, R]):
    """Batch concurrent submissions into flushes, one flush in flight at a time."""

    def __init__(
        self,
        flush: Callable[[Sequence[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_batch: int,
        max_delay_ms: float,
        max_queue: int | None = None,
        name: str = "group-commit",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if max_delay_ms < 0:
            raise ValueError("max_delay_ms must not be negative")
        self._flush = flush
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000
        # Backpressure: callers wait once this many items are queued, so memory is bounded.
        # Each item comes with where its result goes: a caller's future, or a function.
        self._queue: asyncio.Queue[tuple[T, _Sink[R]]] = asyncio.Queue(
            maxsize=max_queue if max_queue is not None else 4 * max_batch
        )
        self.name = name
        self.stats = GroupCommitStats()
        self.flushed = asyncio.Event()  # test signal: set after every flush
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def queue_depth(self) -> int:
        """Return how many submissions wait for a flush."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the flusher task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self.name)

    async def submit(self, item: T) -> R:
        """Queue `item` and return its result once the flush that holds it committed."""
        if self._closed:
            raise GroupCommitterClosedError(f"{self.name} is stopped")
        if self._task is None:
            self.start()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        self._record_depth()
        return await future

    def submit_nowait(self, item: T, on_done: Callable[[R | BaseException], None]) -> bool:
        """Queue `item` if there is room, and return True; False: closed or full, use submit().

        `on_done` receives its result (or the exception of its flush) in the flusher, right
        after the flush that holds it: no future, no waiting task, no wake-up per item.
        It must not raise (what it raises is logged and dropped).
        """
        if self._closed or self._queue.full():
            return False
        if self._task is None:
            self.start()
        self._queue.put_nowait((item, on_done))
        self._record_depth()
        return True

    def _record_depth(self) -> None:
        depth = self._queue.qsize()
        if depth > self.stats.max_queue_depth:
            self.stats.max_queue_depth = depth

    async def stop(self) -> None:
        """Refuse new items, flush everything already accepted, then stop."""
        self._closed = True
        if self._task is None:
            return
        await self._queue.put(_STOP)  # type: ignore[arg-type]
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None

    async def _run(self) -> None:
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is _STOP:
                break
            batch = [first]
            deadline = time.monotonic() + self.max_delay_s
            while len(batch) < self.max_batch:
                try:
                    entry = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    try:
                        # asyncio.timeout, not wait_for: no task per waited item
                        async with asyncio.timeout(remaining):
                            entry = await self._queue.get()
                    except TimeoutError:
                        break
                if entry is _STOP:
                    stopping = True
                    break
                batch.append(entry)
            await self._flush_batch(batch)
        # Final flush: whatever was accepted before stop() is written, never dropped.
        rest: list[tuple[T, _Sink[R]]] = []
        while not self._queue.empty():
            entry = self._queue.get_nowait()
            if entry is not _STOP:
                rest.append(entry)
        for start in range(0, len(rest), self.max_batch):
            await self._flush_batch(rest[start : start + self.max_batch])

    async def _flush_batch(self, batch: list[tuple[T, _Sink[R]]]) -> None:
        started = time.monotonic()
        try:
            results = await self._flush([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"flush returned {len(results)} results for {len(batch)} items")
        except Exception as exc:  # the flush failed as a whole: every caller learns why
            self.stats.failed_flushes += 1
            results = [exc] * len(batch)
        elapsed = time.monotonic() - started
        stats = self.stats
        stats.flushes += 1
        stats.items += len(batch)
        stats.flush_seconds_total += elapsed
        stats.last_flush_seconds = elapsed
        stats.recent_flush_seconds.append(elapsed)
        stats.max_flush_size = max(stats.max_flush_size, len(batch))
        stats.flush_sizes[len(batch)] = stats.flush_sizes.get(len(batch), 0) + 1
        for (_, sink), result in zip(batch, results, strict=True):
            if not isinstance(sink, asyncio.Future):
                try:
                    sink(result)
                except Exception:
                    _log.exception("%s: a result callback failed", self.name)
            elif sink.done():
                continue
            elif isinstance(result, BaseException):
                sink.set_exception(result)
            else:
                sink.set_result(result)
        self.flushed.set()
        self.flushed.clear()


_STOP: object = object()
# Where one queued item's result goes: the future its submit() awaits, or submit_nowait's
# function.
_Sink = asyncio.Future[R] | Callable[[R | BaseException], None]
