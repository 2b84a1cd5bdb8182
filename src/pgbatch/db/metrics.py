"""Queries for metrics: the database's view of all work, read cheaply enough to scrape."""

from __future__ import annotations

from typing import Any

import psycopg

from pgbatch.db.queries import query
from pgbatch.db.retention import table_bytes
from pgbatch.models import MetricsSnapshot

__all__ = ["metrics_snapshot"]


async def metrics_snapshot(conn: psycopg.AsyncConnection[Any]) -> MetricsSnapshot:
    """Return shards by state, items finished, lease takeovers and refunds, batches by status."""
    row = await (await conn.execute(query("metrics_snapshot"))).fetchone()
    status_rows = await (await conn.execute(query("metrics_batches"))).fetchall()
    assert row is not None  # an aggregate without GROUP BY always answers one row
    queued, running, done, dead, ok, failed, cancelled, takeovers, refunds, pruned = (
        int(v) for v in row
    )
    return MetricsSnapshot(
        shards_queued=queued,
        shards_running=running,
        shards_done=done,
        shards_dead=dead,
        items_ok=ok,
        items_failed=failed,
        items_cancelled=cancelled,
        lease_takeovers=takeovers,
        lease_refunds=refunds,
        batches_by_status={str(status): int(count) for status, count in status_rows},
        batches_pruned=pruned,
        table_bytes=await table_bytes(conn),
    )
