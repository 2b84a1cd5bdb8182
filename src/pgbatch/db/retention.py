"""Retention: remove finished batches after their retention period, in bounded steps.

A batch is pruned in two phases. One short transaction (`retention_detach`) locks the
batch row, re-checks that the batch is final and due, writes its tombstone and deletes
the row: from then on the batch answers "pruned" (HTTP 410) everywhere, and no retry can
reopen it. Its shards, items, results and workload rows then go in chunks of at most
`chunk_rows` rows per table, one transaction each, so a huge batch never holds one long
transaction; a pruner that stops half-way leaves the tombstone uncleaned, and the next
pass finishes it. Every transaction waits at most `lock_timeout_ms` for a row lock: a
batch that is busy is skipped and retried on a later pass. After a pass that deleted
rows, `vacuum_pruned_tables` gives their space back to the next batches (a plain VACUUM
of the core tables, each at most once per interval).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql

from pgbatch.db.queries import query

__all__ = [
    "PruneHook",
    "PruneReport",
    "Tombstone",
    "batch_exists",
    "due_batches",
    "prune_batches",
    "table_bytes",
    "tombstone",
    "try_retention_lock",
    "unlock_retention",
    "vacuum_pruned_tables",
]

_log = logging.getLogger(__name__)

# Deletes at most `limit` rows of one pruned batch from a workload's own tables, in the
# caller's transaction, and returns how many it deleted (0 when none is left).
PruneHook = Callable[[psycopg.AsyncConnection[Any], int, int], Awaitable[int]]

# Failures that mean "busy now, try later": a row lock not granted in time, or a deadlock.
_BUSY_ERRORS = (pg_errors.LockNotAvailable, pg_errors.DeadlockDetected, pg_errors.QueryCanceled)

# The pruning pass's statements are never prepared (issue 13): its own VACUUM records the
# emptied tables as empty, psycopg prepares a statement after five executions, and a generic
# plan of retention_clean_rest built there for an empty pgbatch.shards ran for minutes (a
# semi-join rescanned per row) once the next batch had filled the table. A custom plan
# sees the table's current size; the pass is background work, planning is cheap.
_PREPARE = False

# pgbatch's own tables that pruning deletes from (a workload vacuums its own, or leaves them
# to autovacuum). pruned_batches only grows: autovacuum's insert threshold is enough.
VACUUM_TABLES = (
    "batches",
    "callbacks",
    "item_blocks",
    "result_blocks",
    "result_errors",
    "shards",
    "tracebacks",
)


@dataclass(frozen=True, slots=True)
class Tombstone:
    """What is left of a pruned batch: when it finished and when it was pruned."""

    batch_id: int
    finished_at: datetime
    pruned_at: datetime


@dataclass(slots=True)
class PruneReport:
    """What one pruning pass did."""

    # batches this pass detached (their tombstone written, their row deleted)
    pruned: list[int] = field(default_factory=list)
    # pruned batches whose rows are now all gone (this pass's, or earlier unfinished ones)
    cleaned: list[int] = field(default_factory=list)
    # batches skipped because a lock was not granted in time: retried on a later pass
    busy: list[int] = field(default_factory=list)
    rows_deleted: int = 0
    # tables vacuumed after the pass (vacuum_pruned_tables), in name order
    vacuumed: list[str] = field(default_factory=list)


async def due_batches(
    conn: psycopg.AsyncConnection[Any],
    *,
    finished_before: datetime | None = None,
    now: datetime | None = None,
    limit: int = 100,
) -> list[int]:
    """Return the ids of final batches due for pruning (past retention, or finished before)."""
    cur = await conn.execute(
        query("retention_candidates"),
        {"finished_before": finished_before, "now": now, "limit": limit},
        prepare=_PREPARE,
    )
    return [row[0] for row in await cur.fetchall()]


async def _lock_timeout(conn: psycopg.AsyncConnection[Any], lock_timeout_ms: int) -> None:
    await conn.execute(
        query("retention_lock_timeout"), {"lock_timeout": f"{lock_timeout_ms}ms"}, prepare=_PREPARE
    )


async def _detach(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    finished_before: datetime | None,
    now: datetime | None,
    lock_timeout_ms: int,
) -> bool:
    async with conn.transaction():
        await _lock_timeout(conn, lock_timeout_ms)
        cur = await conn.execute(
            query("retention_detach"),
            {"batch_id": batch_id, "finished_before": finished_before, "now": now},
            prepare=_PREPARE,
        )
        return await cur.fetchone() is not None


async def _clean(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    hooks: Sequence[PruneHook],
    chunk_rows: int,
    lock_timeout_ms: int,
) -> tuple[bool, int]:
    """Delete a pruned batch's rows chunk by chunk; return (all gone, rows deleted).

    Items and results go by seq range and shards by shard_no range (a shard holds at
    least one item, so both ranges end by total_items), then a last sweep and the
    workloads' hooks until nothing is left. False when another pruner holds the
    tombstone (it is cleaning this batch).
    """
    total = 0
    lo = 0
    while True:
        async with conn.transaction():
            await _lock_timeout(conn, lock_timeout_ms)
            cur = await conn.execute(
                query("retention_clean_range"),
                {"batch_id": batch_id, "lo": lo, "hi": lo + chunk_rows},
                prepare=_PREPARE,
            )
            row = await cur.fetchone()
            assert row is not None
            claimed, deleted, total_items = int(row[0]), int(row[1]), row[2]
        if not claimed:
            return False, total
        total += deleted
        lo += chunk_rows
        if lo >= (total_items or 0):
            break
    while True:
        async with conn.transaction():
            await _lock_timeout(conn, lock_timeout_ms)
            cur = await conn.execute(
                query("retention_clean_rest"),
                {"batch_id": batch_id, "limit": chunk_rows},
                prepare=_PREPARE,
            )
            row = await cur.fetchone()
            assert row is not None
            claimed, deleted = int(row[0]), int(row[1])
            if not claimed:
                return False, total
            for hook in hooks:
                deleted += await hook(conn, batch_id, chunk_rows)
            total += deleted
            if deleted == 0:
                await conn.execute(
                    query("retention_mark_clean"), {"batch_id": batch_id}, prepare=_PREPARE
                )
                return True, total


async def prune_batches(
    conn: psycopg.AsyncConnection[Any],
    *,
    finished_before: datetime | None = None,
    now: datetime | None = None,
    limit: int = 100,
    hooks: Sequence[PruneHook] = (),
    chunk_rows: int = 10_000,
    lock_timeout_ms: int = 50,
) -> PruneReport:
    """Prune up to `limit` due batches and finish any earlier pruning left half-done.

    Safe to run from many processes at once: a batch is detached by one of them (its row
    lock and tombstone decide), and cleaned by one at a time (the tombstone's lock).
    """
    report = PruneReport()
    for batch_id in await due_batches(conn, finished_before=finished_before, now=now, limit=limit):
        try:
            if await _detach(
                conn,
                batch_id,
                finished_before=finished_before,
                now=now,
                lock_timeout_ms=lock_timeout_ms,
            ):
                report.pruned.append(batch_id)
        except _BUSY_ERRORS as exc:
            _log.info("pruning batch %d later: %s", batch_id, type(exc).__name__)
            report.busy.append(batch_id)
    unclean = await conn.execute(query("retention_unclean"), {"limit": limit}, prepare=_PREPARE)
    for (batch_id,) in await unclean.fetchall():
        try:
            done, deleted = await _clean(
                conn,
                batch_id,
                hooks=hooks,
                chunk_rows=chunk_rows,
                lock_timeout_ms=lock_timeout_ms,
            )
        except _BUSY_ERRORS as exc:
            _log.info("cleaning pruned batch %d later: %s", batch_id, type(exc).__name__)
            report.busy.append(batch_id)
            continue
        report.rows_deleted += deleted
        if done:
            report.cleaned.append(batch_id)
    return report


async def vacuum_pruned_tables(
    conn: psycopg.AsyncConnection[Any], *, interval_s: float, lock_timeout_ms: int
) -> list[str]:
    """VACUUM each pruned table that no vacuum processed for `interval_s`; return those done.

    Plain VACUUM takes SHARE UPDATE EXCLUSIVE, which claims, heartbeats and completions
    (row locks, ROW EXCLUSIVE) never wait for; SKIP_LOCKED skips a table another vacuum
    or a migration holds, and `lock_timeout_ms` bounds the wait for its indexes. A long
    transaction elsewhere cannot block it either: it only keeps the rows it can still see.
    `conn` must be in autocommit mode (VACUUM refuses a transaction block).
    """
    if not conn.autocommit:
        raise ValueError("vacuum_pruned_tables needs an autocommit connection")
    cur = await conn.execute(
        query("retention_vacuum_due"), {"tables": list(VACUUM_TABLES), "interval_s": interval_s}
    )
    due = [str(row[0]) for row in await cur.fetchall()]
    if not due:
        return []
    row = await (await conn.execute(query("retention_session_lock_timeout_get"))).fetchone()
    previous = str(row[0]) if row else "0"
    await conn.execute(
        query("retention_session_lock_timeout_set"), {"lock_timeout": f"{lock_timeout_ms}ms"}
    )
    vacuumed: list[str] = []
    # SKIP_LOCKED says "skipping vacuum of ..." as a warning, not an error.
    warnings: list[str] = []

    def collect(diag: psycopg.errors.Diagnostic) -> None:
        warnings.append(diag.message_primary or "")

    conn.add_notice_handler(collect)
    try:
        for table in due:
            warnings.clear()
            statement = sql.SQL(query("retention_vacuum")).format(table=sql.Identifier(table))
            try:
                await conn.execute(statement)
            except _BUSY_ERRORS as exc:
                _log.info("vacuum of pgbatch.%s later: %s", table, type(exc).__name__)
                continue
            if any(w.startswith("skipping") for w in warnings):
                _log.info("vacuum of pgbatch.%s later: %s", table, warnings[0])
                continue
            vacuumed.append(table)
    finally:
        conn.remove_notice_handler(collect)
        await conn.execute(query("retention_session_lock_timeout_set"), {"lock_timeout": previous})
    return vacuumed


async def tombstone(
    conn: psycopg.AsyncConnection[Any], batch_id: int, *, tenant: str | None = None
) -> Tombstone | None:
    """Return the tombstone of a pruned batch (of `tenant`, when given), or None."""
    cur = await conn.execute(query("retention_tombstone"), {"batch_id": batch_id, "tenant": tenant})
    row = await cur.fetchone()
    return None if row is None else Tombstone(row[0], row[2], row[1])


async def batch_exists(conn: psycopg.AsyncConnection[Any], batch_id: int) -> bool:
    """Tell whether the batch row is still there (it goes first when a batch is pruned)."""
    row = await (
        await conn.execute(query("retention_batch_exists"), {"batch_id": batch_id})
    ).fetchone()
    return bool(row and row[0])


async def try_retention_lock(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Take the one automatic pruner's session lock if no other process holds it."""
    row = await (await conn.execute(query("retention_try_lock"))).fetchone()
    return bool(row and row[0])


async def unlock_retention(conn: psycopg.AsyncConnection[Any]) -> None:
    """Release the automatic pruner's session lock."""
    await conn.execute(query("retention_unlock"))


async def table_bytes(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
    """Return the total size in bytes (heap, indexes, TOAST) of each per-batch table."""
    cur = await conn.execute(query("retention_table_bytes"))
    return {str(name): int(size) for name, size in await cur.fetchall()}
