"""What goes into the writer and what comes out: items, outcomes and stats."""

from __future__ import annotations

import enum
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Key", "SortableKey", "WriteItem", "WriteOutcome", "WriteStatus", "WriterStats"]


class SortableKey(Hashable, Protocol):
    """A key the writer can hash and sort (uuid.UUID, str, int …)."""

    def __lt__(self, other: Any, /) -> bool:
        """Order keys: a flush locks rows in this order (invariant 6)."""
        ...


Key = TypeVar("Key", bound=SortableKey)
Payload = TypeVar("Payload")


@dataclass(frozen=True, slots=True)
class WriteItem(Generic[Key, Payload]):
    """One item to write: its key, the keys it references, its lane and what the sink writes."""

    key: Key
    payload: Payload
    references: frozenset[Key] = frozenset()
    # Items of one partition share a lane, so they can land in one flush and reference
    # each other there; items of different lanes commit independently.
    partition: str = ""


class WriteStatus(enum.StrEnum):
    """What became of one write."""

    WRITTEN = "written"  # committed: durable before write() returned
    REJECTED = "rejected"  # not written, for a reason of its own; retrying it unchanged won't help
    CONFLICT = "conflict"  # not written: deadlocks or serialization failures outlasted the retries


@dataclass(frozen=True, slots=True)
class WriteOutcome(Generic[Key]):
    """The outcome of one write, told to its own caller."""

    status: WriteStatus
    reason: str = ""
    # references that neither exist nor were written in the same flush
    missing: frozenset[Key] = frozenset()
    # references to items of the same flush that were themselves rejected
    blocked_by: frozenset[Key] = frozenset()
    # the SQLSTATE of the database error that rejected the item alone (a constraint, say)
    sqlstate: str | None = None

    @property
    def written(self) -> bool:
        """Tell whether the item committed."""
        return self.status is WriteStatus.WRITTEN


@dataclass(frozen=True, slots=True)
class WriterStats:
    """A snapshot of a writer's counters, summed over its lanes."""

    lanes: int
    queue_depth: int  # items waiting for a flush right now
    max_queue_depth: int  # the highest queue depth seen in any one lane
    flushes: int
    items: int
    written: int
    rejected: int
    conflicts: int
    failed: int  # items whose flush failed as a whole (their callers got WriteFailedError)
    retries: int  # transactions rerun after a deadlock or serialization failure
    isolations: int  # flushes whose fast path failed and that isolated the failing items
    flush_p50_s: float
    flush_p99_s: float
    flush_max_s: float
    # flush size → number of flushes of that size
    flush_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_flush_size(self) -> float:
        """Return the mean number of items per flush."""
        return self.items / self.flushes if self.flushes else 0.0
