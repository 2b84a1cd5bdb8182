"""LISTEN for notifications: the channels pgbatch sends on, and subscribing a connection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from pgbatch.db.queries import query

__all__ = ["PROGRESS_CHANNEL", "listen", "progress_batch_id"]

# Every change of a batch's counters or status sends its id here (see batches.sql).
PROGRESS_CHANNEL = "pgbatch_progress"


async def listen(conn: psycopg.AsyncConnection[Any], channels: Sequence[str]) -> None:
    """Subscribe `conn` to `channels` (each name quoted as an identifier)."""
    for channel in channels:
        await conn.execute(sql.SQL(query("notify_listen")).format(channel=sql.Identifier(channel)))


def progress_batch_id(payload: str) -> int | None:
    """Return the batch id a progress notification carries, or None if it carries none."""
    try:
        return int(payload)
    except ValueError:
        return None
