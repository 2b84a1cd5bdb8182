"""Frozen dataclasses and status enums shared by the engine, the database layer, the API and
users."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from pgbatch.errors import BatchNotFoundError

__all__ = [
    "Batch",
    "BatchFilter",
    "BatchInsight",
    "BatchStatus",
    "ClaimedShard",
    "Item",
    "MetricsSnapshot",
    "Outcome",
    "ShardFailure",
    "ShardStatus",
    "TableRows",
    "check_batch_id",
    "error",
    "ok",
]


# Batch ids are bigint: a larger one names no batch.
BIGINT_MAX = 2**63 - 1


class BatchStatus(enum.StrEnum):
    """Lifecycle of a batch: pending → running → succeeded | failed | cancelled."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Tell whether the batch has ended."""
        return self in (BatchStatus.SUCCEEDED, BatchStatus.FAILED, BatchStatus.CANCELLED)


class ShardStatus(enum.StrEnum):
    """Lifecycle of a shard: queued → running → done | dead | cancelled (or back to queued)."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    DEAD = "dead"
    CANCELLED = "cancelled"


class Item(NamedTuple):
    """One unit of input handed to a task: its position in the batch and its JSON value."""

    # A NamedTuple, not a dataclass: one is built per item on the hot path, and tuple
    # construction is several times cheaper than a frozen dataclass's __init__.
    seq: int
    value: Any


class Outcome(NamedTuple):
    """The terminal result of one item: ok with an output, or an error with a message.

    A failure the handler raised also carries the traceback (bounded, see
    pgbatch/engine/failures.py); an error the handler returned with error() has none.
    """

    ok: bool
    output: Any = None
    error: str | None = None
    traceback: str | None = None


def ok(output: Any = None) -> Outcome:
    """Return a successful outcome carrying `output` (any JSON value)."""
    return Outcome(True, output, None)


def error(message: str) -> Outcome:
    """Return a failed outcome for one item; the shard is not retried for it."""
    return Outcome(False, None, str(message) or "error")


@dataclass(frozen=True, slots=True)
class TableRows:
    """Rows a handler writes to one of the user's tables inside its completion transaction."""

    table: str
    columns: tuple[str, ...]
    rows: Sequence[Sequence[Any]]


@dataclass(frozen=True, slots=True)
class ClaimedShard:
    """A shard this worker holds under `lease_epoch`, with the items it still has to process."""

    id: int
    batch_id: int
    task: str
    lease_epoch: int
    attempts: int
    max_attempts: int
    lease_ttl_s: float
    items: tuple[Item, ...] = field(default=())
    batch_cancelled: bool = False
    # Its batch's tenant: the fair claim's round-robin resumes after the last one served.
    tenant: str = "default"
    # Runs whose expired lease was not counted against max_attempts (invariant 7).
    lease_refunds: int = 0

    @property
    def counted_attempts(self) -> int:
        """Return the attempts that count against max_attempts: runs minus refunds."""
        return self.attempts - self.lease_refunds


@dataclass(frozen=True, slots=True)
class Batch:
    """A batch as stored: its options, counters and status."""

    id: int
    tenant: str
    task: str
    queue: str
    priority: int
    status: BatchStatus
    shard_size: int
    max_attempts: int
    lease_ttl_s: float
    total_items: int
    total_shards: int
    shards_done: int
    shards_dead: int
    items_ok: int
    items_failed: int
    run_no: int
    on_complete: str | None
    idempotency_key: str | None
    version: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    # A label and string pairs set at submit (issue 12 §2); none on older batches.
    name: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    # Items ended by a cancellation: they have a result ('cancelled') but did not fail.
    items_cancelled: int = 0

    @property
    def items_done(self) -> int:
        """Count the items that have a terminal result (cancelled ones too)."""
        return self.items_ok + self.items_failed + self.items_cancelled

    @property
    def waiting_s(self) -> float | None:
        """Return the seconds from submit to the first claim (None before it)."""
        if self.started_at is None:
            return None
        return max(0.0, (self.started_at - self.created_at).total_seconds())

    @property
    def running_s(self) -> float | None:
        """Return the seconds from the first claim to the end (None before the first claim)."""
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at).total_seconds())

    @property
    def is_final(self) -> bool:
        """Tell whether the batch has ended: every shard is terminal (a cancelled batch
        whose running shards have not stopped yet is still ending)."""
        return self.finished_at is not None


def check_batch_id(batch_id: int) -> int:
    """Return `batch_id`, or raise BatchNotFoundError if no bigint id could be it.

    Ids come from clients (paths, CLI arguments): one beyond bigint would otherwise reach
    PostgreSQL and fail as an out-of-range error instead of "no such batch".
    """
    if not 0 < batch_id <= BIGINT_MAX:
        raise BatchNotFoundError(f"no batch with id {batch_id}")
    return batch_id


@dataclass(frozen=True, slots=True)
class BatchFilter:
    """Which batches a listing returns; None means "any"."""

    tenant: str | None = None
    status: BatchStatus | None = None
    task: str | None = None
    name: str | None = None
    # Pairs every listed batch's metadata holds (containment: other keys may be there).
    metadata: dict[str, str] | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    before_id: int | None = None  # the cursor: the last id of the previous page


@dataclass(frozen=True, slots=True)
class BatchInsight:
    """What a dashboard shows about one batch besides its counters."""

    shard_states: dict[str, int]
    throughput: list[tuple[datetime, int]]  # (bucket start, items finished in it)
    bucket_s: int
    error_samples: list[tuple[int, str]]  # (seq, error) of failed items
    dead_shards: list[tuple[int, int, int, str | None]]  # (shard_no, first, last, error)
    # The batch's most recent shard failure (None if no shard holds one), and the
    # tracebacks of the dead shards above, by shard_no.
    last_error: ShardFailure | None = None
    dead_shard_tracebacks: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ShardFailure:
    """A shard's last failure: what it said, its traceback, and when it happened."""

    shard_no: int
    status: ShardStatus
    first_seq: int
    last_seq: int
    error: str
    traceback: str | None
    at: datetime | None


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """The database's view of all work at one moment, for /metrics."""

    shards_queued: int
    shards_running: int
    shards_done: int
    shards_dead: int
    items_ok: int
    items_failed: int
    lease_takeovers: int
    lease_refunds: int
    batches_by_status: dict[str, int]
    # Ended by a cancellation: apart from failed, and not throughput.
    items_cancelled: int = 0
    # finished batches removed by retention, ever
    batches_pruned: int = 0
    # total bytes (heap, indexes, TOAST) of each per-batch table
    table_bytes: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ErrorGroup:
    """The failed items of a batch that share one error text: how many, and a few of them."""

    error: str
    items: int
    first_seq: int
    # (seq, the item's input) of the group's first items, in seq order.
    samples: tuple[tuple[int, Any], ...]
    # When the first and the last of them failed (their shards' finish), if known.
    first_seen_at: datetime | None = None
    last_seen_at: datetime | None = None
    # The traceback of each sample (None where it has none), in the order of `samples`.
    sample_tracebacks: tuple[str | None, ...] = ()
