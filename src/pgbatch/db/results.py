"""Queries on results: read a batch's outcomes back in pages, in item order."""

from __future__ import annotations

from typing import Any

import psycopg

from pgbatch.db.queries import query
from pgbatch.models import Outcome

__all__ = ["list_results"]


async def list_results(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    after_seq: int,
    limit: int,
    errors_only: bool = False,
) -> list[tuple[int, Outcome]]:
    """Return up to `limit` (seq, outcome) of the batch after `after_seq`, in seq order."""
    cur = await conn.execute(
        query("result_list_errors" if errors_only else "result_list"),
        {"batch_id": batch_id, "after_seq": after_seq, "limit": limit},
    )
    return [(seq, Outcome(ok, output, error)) for seq, ok, output, error in await cur.fetchall()]
