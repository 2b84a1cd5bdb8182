"""Queries on the completion-callback outbox: claim, finish, fail, rescue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.queries import query

__all__ = [
    "ClaimedCallback",
    "callback_status",
    "claim_callbacks",
    "fail_callback",
    "finish_callback",
    "rescue_expired_callbacks",
]


@dataclass(frozen=True, slots=True)
class ClaimedCallback:
    """A completion callback this worker holds under `lease_epoch`."""

    id: int
    batch_id: int
    run_no: int
    name: str
    lease_epoch: int
    attempts: int
    batch_status: str


async def claim_callbacks(
    conn: psycopg.AsyncConnection[Any], *, names: Sequence[str], limit: int, lease_ttl_s: float
) -> list[ClaimedCallback]:
    """Claim up to `limit` queued callbacks whose names this worker knows."""
    cur = await conn.execute(
        query("callback_claim"),
        {"names": list(names), "limit": limit, "lease_ttl_s": lease_ttl_s},
    )
    return [ClaimedCallback(*row) for row in await cur.fetchall()]


async def finish_callback(conn: psycopg.AsyncConnection[Any], callback: ClaimedCallback) -> bool:
    """Mark the callback done (in the caller's transaction); False if its lease was lost."""
    cur = await conn.execute(
        query("callback_done"), {"callback_id": callback.id, "epoch": callback.lease_epoch}
    )
    return cur.rowcount == 1


async def fail_callback(
    conn: psycopg.AsyncConnection[Any],
    callback: ClaimedCallback,
    *,
    error: str,
    delay_s: float,
    max_attempts: int,
) -> str | None:
    """Record a failed attempt; return the new status, or None if the lease was lost."""
    cur = await conn.execute(
        query("callback_failed"),
        {
            "callback_id": callback.id,
            "epoch": callback.lease_epoch,
            "error": error,
            "delay_s": delay_s,
            "max_attempts": max_attempts,
        },
    )
    row = await cur.fetchone()
    return None if row is None else str(row[0])


async def rescue_expired_callbacks(conn: psycopg.AsyncConnection[Any], *, max_attempts: int) -> int:
    """Return callbacks whose lease expired to the queue (or give up); return how many."""
    async with conn.transaction():
        cur = await conn.execute(query("callback_rescue_expired"), {"max_attempts": max_attempts})
        if cur.rowcount:
            await conn.execute(query("callback_notify"))
    return cur.rowcount


async def callback_status(
    conn: psycopg.AsyncConnection[Any], batch_id: int, run_no: int
) -> str | None:
    """Return the status of the completion callback of a batch's run, or None if none."""
    cur = await conn.execute(query("callback_status"), {"batch_id": batch_id, "run_no": run_no})
    row = await cur.fetchone()
    return None if row is None else str(row[0])
