"""One flush: resolve references, write set-based in one transaction, isolate what fails.

The pipeline of a flush, each step in its own function:

1. `_generations`: a key that appears twice in a flush (two callers posting the same
   document) is written in a later transaction, so each version commits in arrival order.
2. `_write_in_one_statement` (fast path): the sink's `write_flush`, one statement on an
   autocommit connection, checks every referenced key in one query and writes all items
   and their references; one round trip, one implicit transaction. Only when a
   reference is missing does it write nothing and report which keys exist; then the
   fixpoint of `resolve` picks the items to keep and they are written the same way.
3. `_write_statement_by_statement`: an explicit transaction with the existence query,
   the items, then their references. When the fast path failed for a reason of one
   item (a constraint, bad data), the same writes run bisected inside savepoints: a
   failing item is rejected alone, and so are the items of the flush that depend on it.
4. Deadlocks and serialization failures rerun the transaction with jittered backoff
   (`Database.run_in_transaction`, `run_autocommit`); when they outlast the retries
   every item of the transaction gets a CONFLICT outcome, never an exception.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic

import psycopg

from pgbatch.db.database import RETRYABLE_ERRORS, Database
from pgbatch.engine.group_commit import isolate_failures
from pgbatch.writer.models import Key, Payload, WriteItem, WriteOutcome, WriteStatus
from pgbatch.writer.resolve import Resolution, referenced_keys, resolve
from pgbatch.writer.sink import Sink

__all__ = ["FlushCounters", "FlushPath", "is_item_error", "write_flush"]

# SQLSTATE classes that blame the data of one item rather than the flush: data exceptions
# (22: bad JSON, a NUL byte, a value out of range), integrity violations (23: check,
# unique, foreign key) and program limits (54: a value too large for an index row).
ITEM_ERROR_CLASSES = frozenset({"22", "23", "54"})

WRITTEN: WriteOutcome[Any] = WriteOutcome(WriteStatus.WRITTEN)


class FlushPath(enum.Enum):
    """How a flush's transaction writes its items."""

    # The sink's write_flush: one statement, one implicit transaction (the writer's path).
    ONE_STATEMENT = "one statement"
    # BEGIN, existence query, items, references, COMMIT: how a request handler writes one
    # document in its own transaction (the benchmark's baseline).
    STATEMENT_BY_STATEMENT = "statement by statement"
    # Statement by statement, each write bisected inside savepoints to find bad items.
    ISOLATING = "isolating"


@dataclass(slots=True)
class FlushCounters:
    """What the flushes of one writer did, beyond what the group committer counts."""

    written: int = 0
    rejected: int = 0
    conflicts: int = 0
    failed: int = 0
    retries: int = 0
    isolations: int = 0


def is_item_error(exc: BaseException) -> bool:
    """Tell whether a database error blames one item's data rather than the whole flush."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in ITEM_ERROR_CLASSES


async def write_flush(
    db: Database,
    sink: Sink[Key, Payload],
    items: Sequence[WriteItem[Key, Payload]],
    counters: FlushCounters,
    *,
    path: FlushPath = FlushPath.ONE_STATEMENT,
) -> list[WriteOutcome[Key]]:
    """Write one flush and return each item's outcome, in the order of `items`.

    Raises only when the flush fails as a whole for a reason that is not an item's
    (the database is unreachable, say); then no caller may assume its item committed.
    """
    outcomes: list[WriteOutcome[Key]] = [WRITTEN] * len(items)
    for generation in _generations(items):
        batch = [items[i] for i in generation]
        by_key = await _write_generation(db, sink, batch, counters, path)
        for index in generation:
            outcomes[index] = by_key[items[index].key]
    for outcome in outcomes:
        if outcome.status is WriteStatus.WRITTEN:
            counters.written += 1
        elif outcome.status is WriteStatus.REJECTED:
            counters.rejected += 1
        else:
            counters.conflicts += 1
    return outcomes


def _generations(items: Sequence[WriteItem[Key, Payload]]) -> list[list[int]]:
    """Split item positions so that no key appears twice in one generation."""
    generations: list[list[int]] = []
    seen: dict[Key, int] = {}
    for index, item in enumerate(items):
        generation = seen.get(item.key, 0)
        seen[item.key] = generation + 1
        if generation == len(generations):
            generations.append([])
        generations[generation].append(index)
    return generations


class _ItemsFailed(Exception):
    """Isolation found failing items whose dependants were already written: start over."""

    def __init__(self, failures: dict[Any, WriteOutcome[Any]]) -> None:
        super().__init__(f"{len(failures)} items failed alone")
        self.failures = failures


async def _write_generation(
    db: Database,
    sink: Sink[Key, Payload],
    batch: Sequence[WriteItem[Key, Payload]],
    counters: FlushCounters,
    path: FlushPath,
) -> dict[Key, WriteOutcome[Key]]:
    excluded: dict[Key, WriteOutcome[Key]] = {}
    # Each round either commits or excludes at least one more item, so this ends.
    while True:
        round_ = _Round(sink, batch, dict(excluded), path)
        try:
            if path is FlushPath.ONE_STATEMENT:
                return await db.run_autocommit(round_)
            return await db.run_in_transaction(round_)
        except RETRYABLE_ERRORS as exc:
            first_line = str(exc).strip().split("\n")[0]
            reason = f"gave up after {round_.attempts} attempts: {type(exc).__name__}: {first_line}"
            outcome: WriteOutcome[Key] = WriteOutcome(
                WriteStatus.CONFLICT, reason, sqlstate=exc.sqlstate
            )
            return {item.key: outcome for item in batch}
        except _ItemsFailed as failed:
            excluded.update(failed.failures)
        except psycopg.Error as exc:
            if path is FlushPath.ISOLATING or not is_item_error(exc):
                raise
            path = FlushPath.ISOLATING
            counters.isolations += 1
        finally:
            counters.retries += max(0, round_.attempts - 1)


class _Round(Generic[Key, Payload]):
    """One transaction of a generation, as the database helpers rerun it after a deadlock."""

    def __init__(
        self,
        sink: Sink[Key, Payload],
        batch: Sequence[WriteItem[Key, Payload]],
        excluded: Mapping[Key, WriteOutcome[Key]],
        path: FlushPath,
    ) -> None:
        self.sink = sink
        self.batch = batch
        self.excluded = excluded
        self.path = path
        self.attempts = 0

    async def __call__(self, conn: psycopg.AsyncConnection[Any]) -> dict[Key, WriteOutcome[Key]]:
        self.attempts += 1
        if self.path is FlushPath.ONE_STATEMENT:
            # Items are only ever excluded by isolating, which never returns to this path.
            return await _write_in_one_statement(conn, self.sink, self.batch)
        return await _write_statement_by_statement(
            conn, self.sink, self.batch, self.excluded, isolating=self.path is FlushPath.ISOLATING
        )


async def _write_in_one_statement(
    conn: psycopg.AsyncConnection[Any],
    sink: Sink[Key, Payload],
    batch: Sequence[WriteItem[Key, Payload]],
) -> dict[Key, WriteOutcome[Key]]:
    """Write the batch with the sink's one statement; on a missing reference, keep what can be.

    Each statement is its own transaction, and one that finds a missing reference wrote
    nothing, so a second statement for the items that can be kept stands alone.
    """
    # Every reference is assumed satisfiable until the statement says otherwise.
    resolution: Resolution[Key, Payload] = Resolution(tuple(sorted(batch, key=_key_of)), {})
    # Only deletions can make a second statement find a key missing again: each time,
    # the items that reference it are dropped, so this ends.
    for _ in range(len(batch) + 1):
        if not resolution.accepted:
            break
        existing = await sink.write_flush(conn, resolution.accepted)
        if existing is None:
            break
        resolution = resolve(batch, existing)
    else:
        raise RuntimeError("references kept going missing between statements")
    return _outcomes(resolution, {})


def _key_of(item: WriteItem[Key, Payload]) -> Key:
    return item.key


async def _write_statement_by_statement(
    conn: psycopg.AsyncConnection[Any],
    sink: Sink[Key, Payload],
    batch: Sequence[WriteItem[Key, Payload]],
    excluded: Mapping[Key, WriteOutcome[Key]],
    *,
    isolating: bool,
) -> dict[Key, WriteOutcome[Key]]:
    """Run one explicit transaction's worth of a generation (it may run again after a deadlock)."""
    keys = referenced_keys(batch)
    existing: Collection[Key] = frozenset(await sink.existing(conn, keys)) if keys else ()
    resolution = resolve(batch, existing, excluded)
    accepted = resolution.accepted
    if not isolating:
        if accepted:
            await sink.write_items(conn, accepted)
            await sink.write_references(conn, accepted)
        return _outcomes(resolution, {})
    failed = await _isolate(conn, sink.write_items, accepted)
    if failed:
        # The failing items are rolled back to their savepoints. If nothing left depends
        # on them, carry on; otherwise their dependants are already written: start over.
        if any(
            ref in failed and ref not in existing
            for item in accepted
            if item.key not in failed
            for ref in item.references
        ):
            raise _ItemsFailed(failed)
        accepted = tuple(item for item in accepted if item.key not in failed)
    failed_references = await _isolate(conn, sink.write_references, accepted)
    if failed_references:
        # Their items are written already, in the same statement as others: start over.
        raise _ItemsFailed({**failed, **failed_references})
    return _outcomes(resolution, failed)


async def _isolate(
    conn: psycopg.AsyncConnection[Any],
    write: Callable[
        [psycopg.AsyncConnection[Any], Sequence[WriteItem[Key, Payload]]], Awaitable[None]
    ],
    items: Sequence[WriteItem[Key, Payload]],
) -> dict[Key, WriteOutcome[Key]]:
    """Run `write` bisected inside savepoints; return a rejection for each item failing alone."""
    if not items:
        return {}

    async def in_savepoint(subset: Sequence[WriteItem[Key, Payload]]) -> None:
        async with conn.transaction():
            await write(conn, subset)

    failures = await isolate_failures(items, in_savepoint, is_item_error)
    return {item.key: _item_rejection(exc) for item, exc in failures}


def _item_rejection(exc: Exception) -> WriteOutcome[Any]:
    sqlstate = exc.sqlstate if isinstance(exc, psycopg.Error) else None
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WriteOutcome(WriteStatus.REJECTED, message, sqlstate=sqlstate)


def _outcomes(
    resolution: Resolution[Key, Payload], failed: Mapping[Key, WriteOutcome[Key]]
) -> dict[Key, WriteOutcome[Key]]:
    outcomes: dict[Key, WriteOutcome[Key]] = dict(resolution.rejected)
    for item in resolution.accepted:
        outcomes[item.key] = failed.get(item.key, WRITTEN)
    return outcomes
