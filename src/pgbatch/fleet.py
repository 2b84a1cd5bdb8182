"""What the fleet looks like: live workers, queues and why a batch is waiting (issue 12 §2)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["QueueState", "WaitingReason", "WorkerInfo"]


class WaitingReason(enum.StrEnum):
    """Why an unfinished batch makes no progress, when pgbatch can tell."""

    # Its queue is paused: claims skip it until `pgbatch queue resume`.
    QUEUE_PAUSED = "queue_paused"
    # No live worker serves its queue and task: nothing will claim its shards.
    NO_LIVE_WORKER = "no_live_worker"


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """One worker process of the registry, as its last heartbeat described it."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    tasks: tuple[str, ...]
    concurrency: int
    slots_in_use: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    ttl_s: float
    # Silent past ttl_s: it died or froze; it serves nothing and is deleted later.
    expired: bool
    silent_s: float
    # batch id → shards of it this worker holds, for the batches the reader may see only.
    running: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueState:
    """One queue: paused or not, its depth and how long its oldest claimable shard waited."""

    name: str
    paused: bool
    paused_at: datetime | None
    queued_shards: int
    running_shards: int
    # Seconds since the oldest queued shard became claimable (0 when none is claimable).
    oldest_queued_s: float
    live_workers: int
