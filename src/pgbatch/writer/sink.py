"""The sink: what a writer needs to know about the tables it writes, and nothing else."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

import psycopg

from pgbatch.writer.models import Key, Payload, WriteItem

__all__ = ["Sink"]


class Sink(Protocol[Key, Payload]):
    """Write one flush set-based, in the writer's transaction.

    The writer owns the transaction, the retries, the reference resolution and the
    isolation of failing items; a sink only runs statements. Items always arrive in key
    order, and every method must be all-or-nothing for the items it gets (one statement
    per table), so the writer can retry it on a subset inside a savepoint.
    """

    async def existing(
        self, conn: psycopg.AsyncConnection[Any], keys: Sequence[Key]
    ) -> Collection[Key]:
        """Return which of `keys` exist: one set-based query for the whole flush."""
        ...

    async def write_items(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[WriteItem[Key, Payload]]
    ) -> None:
        """Write (upsert) the items themselves; runs before any of their references."""
        ...

    async def write_references(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[WriteItem[Key, Payload]]
    ) -> None:
        """Replace the references of these items, once every item of the flush is written."""
        ...
