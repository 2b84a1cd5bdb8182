"""Queries on the document-ingest tables: the sink the documents writer flushes through."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.database import Database
from pgbatch.db.queries import query
from pgbatch.writer.models import WriteItem

__all__ = ["DocumentRow", "DocumentSink", "create_document_tables"]


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """A document as the sink writes it, encoded once when posted (not in the flush)."""

    type: str
    identity_json: str
    body_json: str


class DocumentSink:
    """Write flushes of documents: one upsert, one reference replacement, one existence query."""

    async def existing(
        self, conn: psycopg.AsyncConnection[Any], keys: Sequence[uuid.UUID]
    ) -> Collection[uuid.UUID]:
        """Return which of `keys` are documents."""
        cur = await conn.execute(query("documents_existing"), {"keys": list(keys)}, prepare=True)
        return {row[0] for row in await cur.fetchall()}

    async def write_items(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: Sequence[WriteItem[uuid.UUID, DocumentRow]],
    ) -> None:
        """Upsert the documents, in key order."""
        await conn.execute(
            query("documents_upsert_many"),
            {
                "keys": [item.key for item in items],
                "partitions": [item.partition for item in items],
                "types": [item.payload.type for item in items],
                "identities": [item.payload.identity_json for item in items],
                "bodies": [item.payload.body_json for item in items],
            },
            prepare=True,
        )

    async def write_references(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: Sequence[WriteItem[uuid.UUID, DocumentRow]],
    ) -> None:
        """Make the references of these documents exactly the ones they carry now."""
        # Not sorted here: the statement inserts the pairs ORDER BY parent, target, and
        # sorting UUID pairs in Python (a Python-level comparison each) cost more client
        # CPU than building the three arrays.
        ref_parents: list[uuid.UUID] = []
        ref_targets: list[uuid.UUID] = []
        for item in items:
            for target in item.references:
                ref_parents.append(item.key)
                ref_targets.append(target)
        await conn.execute(
            query("document_references_replace_many"),
            {
                "parents": [item.key for item in items],
                "ref_parents": ref_parents,
                "ref_targets": ref_targets,
            },
            prepare=True,
        )


async def create_document_tables(db: Database) -> None:
    """Create the documents tables if they are missing (idempotent, safe to race)."""
    async with db.connection() as conn, conn.transaction():
        # Serialise the DDL: several processes starting at once would race on it.
        await conn.execute(query("documents_lock_ddl"))
        await conn.execute(query("documents_create_tables"))
