"""Queries on the fleet: the worker registry, queue pauses, queue depth, waiting reasons."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.queries import query
from pgbatch.fleet import QueueState, WaitingReason, WorkerInfo

__all__ = [
    "WorkerBeat",
    "batch_waiting_reasons",
    "beat_worker",
    "list_queues",
    "list_workers",
    "pause_queue",
    "remove_worker",
    "resume_queue",
]


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    """What a worker writes into the registry at each beat."""

    id: str
    host: str
    pid: int
    queues: Sequence[str]
    tasks: Sequence[str]
    concurrency: int
    slots_in_use: int
    version: str
    ttl_s: float
    gc_after_s: float


async def beat_worker(conn: psycopg.AsyncConnection[Any], beat: WorkerBeat) -> None:
    """Insert or refresh this worker's registry row; delete rows silent past their gc."""
    await conn.execute(
        query("worker_beat"),
        {
            "id": beat.id,
            "host": beat.host,
            "pid": beat.pid,
            "queues": list(beat.queues),
            "tasks": list(beat.tasks),
            "concurrency": beat.concurrency,
            "slots_in_use": beat.slots_in_use,
            "version": beat.version,
            "ttl_s": beat.ttl_s,
            "gc_after_s": beat.gc_after_s,
        },
        prepare=True,
    )


async def remove_worker(conn: psycopg.AsyncConnection[Any], worker_id: str) -> None:
    """Delete a worker's registry row (it stopped cleanly)."""
    await conn.execute(query("worker_remove"), {"id": worker_id})


async def list_workers(
    conn: psycopg.AsyncConnection[Any], *, tenant: str | None
) -> list[WorkerInfo]:
    """Return every registered worker, with the shards it holds of `tenant`'s batches only.

    `tenant=None` shows every tenant's batches (the CLI, which holds the database URL).
    """
    rows = await (await conn.execute(query("worker_list"))).fetchall()
    running: dict[str, dict[int, int]] = defaultdict(dict)
    for worker_id, batch_id, shards in await (
        await conn.execute(query("worker_running_batches"), {"tenant": tenant})
    ).fetchall():
        running[worker_id][batch_id] = int(shards)
    return [
        WorkerInfo(
            id=row[0],
            host=row[1],
            pid=row[2],
            queues=tuple(row[3]),
            tasks=tuple(row[4]),
            concurrency=row[5],
            slots_in_use=row[6],
            version=row[7],
            started_at=row[8],
            heartbeat_at=row[9],
            ttl_s=row[10],
            expired=bool(row[11]),
            silent_s=float(row[12]),
            running=running.get(row[0], {}),
        )
        for row in rows
    ]


async def list_queues(
    conn: psycopg.AsyncConnection[Any], *, tenant: str | None
) -> list[QueueState]:
    """Return every visible queue, its shards counted for `tenant` (None: every tenant)."""
    cur = await conn.execute(query("queue_list"), {"tenant": tenant})
    return [
        QueueState(
            name=name,
            paused=bool(paused),
            paused_at=paused_at,
            queued_shards=int(queued),
            running_shards=int(running),
            oldest_queued_s=float(oldest),
            live_workers=int(workers),
        )
        for name, paused, paused_at, queued, running, oldest, workers in await cur.fetchall()
    ]


async def pause_queue(conn: psycopg.AsyncConnection[Any], queue: str, *, paused_by: str) -> None:
    """Pause `queue` (claims skip it from their next statement on); pausing twice is a no-op."""
    await conn.execute(query("queue_pause"), {"queue": queue, "paused_by": paused_by})


async def resume_queue(conn: psycopg.AsyncConnection[Any], queue: str) -> bool:
    """Resume `queue` and wake its workers; False if it was not paused."""
    cur = await conn.execute(query("queue_resume"), {"queue": queue})
    return bool(await cur.fetchall())


async def batch_waiting_reasons(
    conn: psycopg.AsyncConnection[Any], batches: Sequence[tuple[int, str, str]]
) -> dict[int, WaitingReason]:
    """Return why each unfinished (id, queue, task) batch waits, for those pgbatch can tell."""
    if not batches:
        return {}
    cur = await conn.execute(
        query("batch_waiting_reasons"),
        {
            "ids": [b[0] for b in batches],
            "queues": [b[1] for b in batches],
            "tasks": [b[2] for b in batches],
        },
    )
    return {
        batch_id: WaitingReason(reason)
        for batch_id, reason in await cur.fetchall()
        if reason is not None
    }
