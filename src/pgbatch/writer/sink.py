"""The sink: what a writer needs to know about the tables it writes, and nothing else."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any, Protocol

import psycopg

from pgbatch.writer.models import Key, Payload, WriteItem

__all__ = ["Sink"]


class Sink(Protocol[Key, Payload]):
    """Write one flush set-based, on the connection the writer lends.

    The writer owns the transactions, the retries, the reference resolution and the
    isolation of failing items; a sink only runs statements. Items always arrive in key
    order, and every method must be all-or-nothing for the items it gets, so the writer
    can rerun it on a subset. `write_flush` is the fast path: one statement on an
    autocommit connection, so one implicit transaction. The three others run one by one
    inside an explicit transaction: when the writer isolates a failing item (each write
    in savepoints), and on `FlushPath.STATEMENT_BY_STATEMENT`.
    """

    async def write_flush(
        self, conn: psycopg.AsyncConnection[Any], items: Sequence[WriteItem[Key, Payload]]
    ) -> Collection[Key] | None:
        """Write the items and their references, unless a reference cannot be satisfied.

        A reference is satisfied when its key exists or is one of `items`' keys. Return
        None when written. Otherwise write nothing and return which of the referenced
        keys exist (the answer of `existing`). One set-based existence check for the
        whole flush, then the writes, in one statement (one round trip).
        """
        ...

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
