"""What a handler sees besides its items: its shard, its lease, and rows to commit with it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from psycopg.abc import QueryNoTemplate

from pgbatch.db.shards import CommitStatement
from pgbatch.models import BatchStatus, TableRows

__all__ = ["CallbackContext", "ShardContext", "WriteBuffer"]


class WriteBuffer:
    """Rows and statements for the user's tables, committed in the completion's transaction."""

    def __init__(self) -> None:
        self.writes: list[TableRows] = []
        # None until a statement is queued: most handlers queue none, and one list fewer
        # per shard is measurable at one item per shard.
        self._statements: list[CommitStatement] | None = None

    @property
    def statements(self) -> Sequence[CommitStatement]:
        """Return the statements queued with execute_at_commit(), in queue order."""
        return self._statements or ()

    def execute_at_commit(
        self,
        statement: QueryNoTemplate,
        params: Mapping[str, Any] | Sequence[Any] | None = None,
    ) -> None:
        """Queue `statement` to run in the completion transaction, only if that commit counts.

        It runs after the results and copy_rows() writes and is fenced like them: a worker
        whose lease was taken over runs nothing. If it fails, that commit fails as a whole
        (a shard's attempt fails and is retried; its neighbours in the flush still commit).
        """
        if self._statements is None:
            self._statements = []
        self._statements.append(CommitStatement(statement, params))

    def copy_rows(
        self,
        table: str,
        rows: Iterable[Mapping[str, Any] | Sequence[Any]],
        *,
        columns: Sequence[str] | None = None,
    ) -> None:
        """Queue `rows` for `table` (dicts, or sequences with `columns`); COPY writes them."""
        materialised = list(rows)
        if not materialised:
            return
        first = materialised[0]
        if isinstance(first, Mapping):
            cols = tuple(columns) if columns is not None else tuple(first.keys())
            values: list[Sequence[Any]] = []
            for row in materialised:
                assert isinstance(row, Mapping)
                values.append(tuple(row[c] for c in cols))
        else:
            if columns is None:
                raise ValueError(f"copy_rows({table!r}): rows are sequences, so pass columns=")
            cols = tuple(columns)
            values = [tuple(row) for row in materialised]
            for row in values:
                if len(row) != len(cols):
                    raise ValueError(
                        f"copy_rows({table!r}): a row has {len(row)} values for {len(cols)} columns"
                    )
        self.writes.append(TableRows(table, cols, values))


class ShardContext(WriteBuffer):
    """The shard a handler is processing, and the signal that it lost the shard."""

    def __init__(
        self, *, batch_id: int, shard_id: int, attempt: int, lease_epoch: int, task: str
    ) -> None:
        super().__init__()
        self.batch_id = batch_id
        self.shard_id = shard_id
        self.attempt = attempt
        self.lease_epoch = lease_epoch
        self.task = task
        # Plain flags, and an event only for a handler that waits on them: most handlers
        # never look, and two Events per shard are measurable at one item per shard.
        self._lost = False
        self._cancelled = False
        self._changed: asyncio.Event | None = None

    @property
    def lost(self) -> bool:
        """Tell whether another worker took the shard over; nothing more will be committed."""
        return self._lost

    @property
    def cancelled(self) -> bool:
        """Tell whether the batch was cancelled."""
        return self._cancelled

    async def wait_lost(self) -> None:
        """Wait until the shard is lost or its batch cancelled (for long handlers)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        if not (self._lost or self._cancelled):
            await self._changed.wait()

    def mark_lost(self) -> None:
        """Record that the lease was lost (called by the worker's heartbeat)."""
        self._lost = True
        if self._changed is not None:
            self._changed.set()

    def mark_cancelled(self) -> None:
        """Record that the batch was cancelled (called by the worker's heartbeat)."""
        self._cancelled = True
        if self._changed is not None:
            self._changed.set()


class CallbackContext(WriteBuffer):
    """What a completion callback sees: rows it queues commit with the callback's done mark."""

    def __init__(
        self, *, callback_id: int, attempt: int, run_no: int, batch_status: BatchStatus
    ) -> None:
        super().__init__()
        self.callback_id = callback_id
        self.attempt = attempt
        # Which run of the batch ended (a retry starts run 2), and how it ended. The Batch
        # the callback receives is read when it runs, and may already be further along.
        self.run_no = run_no
        self.batch_status = batch_status
