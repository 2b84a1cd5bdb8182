"""The workers' automatic pruning: at a low rate, one process at a time across all of them.

A pass that deleted rows ends with a VACUUM of the tables it deleted from (at most once
per `retention_vacuum_interval_s` each), so space comes back before the next batches.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence

import psycopg

from pgbatch.config import Settings
from pgbatch.db.database import Database
from pgbatch.db.retention import (
    PruneHook,
    PruneReport,
    prune_batches,
    try_retention_lock,
    unlock_retention,
    vacuum_pruned_tables,
)

__all__ = ["prune_loop", "prune_once"]

_log = logging.getLogger(__name__)


async def prune_once(
    db: Database, settings: Settings, hooks: Sequence[PruneHook]
) -> PruneReport | None:
    """Run one pruning pass if no other process is pruning; None if one is."""
    async with db.connection() as conn:
        # A session lock, held across the pass's many short transactions; the server
        # drops it with the session if this process dies.
        if not await try_retention_lock(conn):
            return None
        try:
            report = await prune_batches(
                conn,
                limit=settings.retention_batches_per_pass,
                hooks=hooks,
                chunk_rows=settings.retention_chunk_rows,
                lock_timeout_ms=settings.retention_lock_timeout_ms,
            )
            if settings.retention_vacuum and (report.rows_deleted or report.pruned):
                # Under the lock, so the pruners of many workers never vacuum side by side.
                report.vacuumed = await vacuum_pruned_tables(
                    conn,
                    interval_s=settings.retention_vacuum_interval_s,
                    lock_timeout_ms=settings.retention_lock_timeout_ms,
                )
            return report
        finally:
            await unlock_retention(conn)


async def prune_loop(
    db: Database,
    settings: Settings,
    hooks: Sequence[PruneHook],
    on_report: Callable[[PruneReport], None],
) -> None:
    """Prune every `retention_interval_s` (jittered) until cancelled; errors are retried."""
    while True:
        # Jitter so that the workers' attempts spread out; only one wins the lock anyway.
        await asyncio.sleep(settings.retention_interval_s * random.uniform(0.5, 1.5))
        try:
            report = await prune_once(db, settings, hooks)
        except psycopg.Error as exc:
            _log.warning("pruning failed, retried later: %s", exc)
            continue
        if report is not None:
            on_report(report)
            if report.pruned:
                _log.info("pruned %d finished batches", len(report.pruned))
