"""The document-ingest workload's queries: the sink its writer flushes through, reads."""

from __future__ import annotations

import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.arrays import TextArray, UuidArray
from pgbatch.db.database import Database
from pgbatch.db.migrations import Component, migrate
from pgbatch.db.queries import QueryMap
from pgbatch.writer.errors import WriteFailedError
from pgbatch.writer.models import WriteItem

__all__ = [
    "COMPONENT",
    "DocumentRow",
    "DocumentSink",
    "StoredDocument",
    "create_document_tables",
    "get_document",
]


query = QueryMap("pgbatch.workloads.documents")
# The workload's migrations, as the runner knows them (the WORKLOAD's component).
COMPONENT = Component("documents", "pgbatch.workloads.documents")


@dataclass(frozen=True, slots=True)
class DocumentRow:
    """A document as the sink writes it, encoded once when posted (not in the flush)."""

    type: str
    identity_json: str
    body_json: str


@dataclass(frozen=True, slots=True)
class StoredDocument:
    """A committed document as read back: its identity, body and referenced identities."""

    key: uuid.UUID
    identity: dict[str, Any]
    body: dict[str, Any]
    references: list[dict[str, Any]]


class DocumentSink:
    """Write flushes of documents through the functions of documents.sql."""

    async def write_flush(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: Sequence[WriteItem[uuid.UUID, DocumentRow]],
    ) -> Collection[uuid.UUID] | None:
        """Write the documents and their references in one call unless a reference is missing.

        Returns None when written; otherwise nothing was written, and the return holds
        which of the referenced keys are documents.
        """
        try:
            cur = await conn.execute(
                query("documents_write_flush"),
                {**_document_arrays(items), **_reference_arrays(items)},
                prepare=True,
            )
        except psycopg.errors.UndefinedFunction as exc:
            raise WriteFailedError(
                "the documents tables are missing: use the documents workload on the app "
                "(app.use(documents.WORKLOAD)) or call create_document_tables(db) once"
            ) from exc
        row = await cur.fetchone()
        found: list[uuid.UUID] | None = row[0] if row else None
        return None if found is None else set(found)

    async def existing(
        self, conn: psycopg.AsyncConnection[Any], keys: Sequence[uuid.UUID]
    ) -> Collection[uuid.UUID]:
        """Return which of `keys` are documents."""
        cur = await conn.execute(
            query("documents_existing"), {"keys": UuidArray(keys)}, prepare=True
        )
        return {row[0] for row in await cur.fetchall()}

    async def write_items(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: Sequence[WriteItem[uuid.UUID, DocumentRow]],
    ) -> None:
        """Upsert the documents, in key order."""
        await conn.execute(query("documents_upsert_many"), _document_arrays(items), prepare=True)

    async def write_references(
        self,
        conn: psycopg.AsyncConnection[Any],
        items: Sequence[WriteItem[uuid.UUID, DocumentRow]],
    ) -> None:
        """Make the references of these documents exactly the ones they carry now."""
        await conn.execute(
            query("document_references_replace_many"),
            {"parents": UuidArray([item.key for item in items]), **_reference_arrays(items)},
            prepare=True,
        )


def _document_arrays(items: Sequence[WriteItem[uuid.UUID, DocumentRow]]) -> dict[str, list[Any]]:
    return {
        "keys": UuidArray([item.key for item in items]),
        "partitions": TextArray([item.partition for item in items]),
        "types": TextArray([item.payload.type for item in items]),
        "identities": TextArray([item.payload.identity_json for item in items]),
        "bodies": TextArray([item.payload.body_json for item in items]),
    }


def _reference_arrays(
    items: Sequence[WriteItem[uuid.UUID, DocumentRow]],
) -> dict[str, list[uuid.UUID]]:
    # Not sorted here: the statement inserts the pairs ORDER BY parent, target, and
    # sorting UUID pairs in Python (a Python-level comparison each) cost more client
    # CPU than building the arrays.
    ref_parents = UuidArray()
    ref_targets = UuidArray()
    for item in items:
        for target in item.references:
            ref_parents.append(item.key)
            ref_targets.append(target)
    return {"ref_parents": ref_parents, "ref_targets": ref_targets}


async def create_document_tables(db: Database) -> None:
    """Apply the workload's migrations: its tables and write functions (safe to race).

    An App that uses the workload does this when it opens; a `DocumentWriter` on a bare
    `Database` calls it once.
    """
    async with db.connection() as conn:
        await migrate(conn, components=[COMPONENT])


async def get_document(
    db: Database, key: uuid.UUID, *, tenant: str, default_tenant: str
) -> StoredDocument | None:
    """Return `tenant`'s document `key`, or None (no such key, or another tenant's)."""
    async with db.connection() as conn:
        try:
            cur = await conn.execute(
                query("document_get"),
                {"key": key, "tenant": tenant, "default_tenant": default_tenant},
            )
        except psycopg.errors.UndefinedTable:
            return None  # the workload's migrations never ran here: no document either
        row = await cur.fetchone()
    if row is None:
        return None
    return StoredDocument(row[0], row[1], row[2], row[3])
