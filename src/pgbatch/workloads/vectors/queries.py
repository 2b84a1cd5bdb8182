"""The vector-library workload's queries: libraries, documents, chunks, index commits, search."""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from pgbatch.db.queries import QueryMap
from pgbatch.db.shards import CommitStatement

__all__ = [
    "COMPONENT_NAME",
    "ChunkRow",
    "DocumentRecord",
    "LibraryRecord",
    "SearchRow",
    "chunks_table",
]

query = QueryMap("pgbatch.workloads.vectors")
# The HNSW index of a new library's chunks. m 16 is pgvector's default; ef_construction
# 128, not its 64: at 100,000 chunks of 384 (benchmarks/vectors_tune.py, docs/vectors.md)
# 64 left recall@10 stuck at 0.945 whatever ef_search on topic-clustered data (parts of
# the graph poorly linked), 128 gave 0.99-1.00 at ef_search 40-100. Libraries made
# before keep the index they were made with (no migration rebuilds it).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 128
COMPONENT_NAME = "vectors"
MIGRATIONS_PACKAGE = "pgbatch.workloads.vectors"


@dataclass(frozen=True, slots=True)
class LibraryRecord:
    """A library as stored: its fixed embedder and dimension, its metadata and version."""

    id: int
    tenant: str
    name: str
    metadata: dict[str, Any]
    embedder: str
    dimension: int
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DocumentRecord:
    """A document as stored (its content left out): metadata, status and versions."""

    id: int
    library_id: int
    metadata: dict[str, Any]
    status: str
    error: str | None
    version: int
    content_version: int
    indexed_version: int | None
    chunk_count: int
    batch_id: int | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class ChunkRow:
    """One chunk of a document: its place, the content version it came from, its text."""

    seq: int
    content_version: int
    text: str


@dataclass(frozen=True, slots=True)
class SearchRow:
    """One search hit: the chunk, its document's metadata, its cosine distance."""

    document_id: int
    seq: int
    content_version: int
    text: str
    metadata: dict[str, Any]
    distance: float


def chunks_table(library_id: int) -> str:
    """Return the name of a library's chunk table (in schema pgbatch)."""
    return f"vector_chunks_{int(library_id)}"


def _composed(name: str, library_id: int, **extra: sql.Composable) -> sql.Composed:
    return sql.SQL(query(name)).format(chunks=sql.Identifier(chunks_table(library_id)), **extra)


def _library(row: Sequence[Any]) -> LibraryRecord:
    return LibraryRecord(*row)


def _document(row: Sequence[Any]) -> DocumentRecord:
    return DocumentRecord(*row)


async def extension_state(conn: psycopg.AsyncConnection[Any]) -> tuple[bool, bool]:
    """Return (installed in this database, available on the server) for pgvector."""
    cur = await conn.execute(query("vector_extension_state"))
    row = await cur.fetchone()
    assert row is not None
    return bool(row[0]), bool(row[1])


async def create_extension(conn: psycopg.AsyncConnection[Any]) -> None:
    """Create pgvector in this database (serialised with concurrent first creators)."""
    await conn.execute(query("vector_extension_lock"))
    await conn.execute(query("vector_extension_create"))


async def insert_library(
    conn: psycopg.AsyncConnection[Any],
    *,
    tenant: str,
    name: str,
    metadata: dict[str, Any],
    embedder: str,
    dimension: int,
) -> LibraryRecord | None:
    """Insert a library; return None when the tenant already has one of that name."""
    cur = await conn.execute(
        query("vector_library_insert"),
        {
            "tenant": tenant,
            "name": name,
            "metadata": Jsonb(metadata),
            "embedder": embedder,
            "dimension": dimension,
        },
    )
    row = await cur.fetchone()
    return None if row is None else _library(row)


async def create_chunks_table(
    conn: psycopg.AsyncConnection[Any], library_id: int, dimension: int
) -> None:
    """Create the library's chunk table and its HNSW index."""
    await conn.execute(
        _composed("vector_chunks_create", library_id, dimension=sql.Literal(dimension))
    )
    index = sql.Identifier(f"{chunks_table(library_id)}_hnsw")
    await conn.execute(
        _composed(
            "vector_chunks_index",
            library_id,
            index=index,
            m=sql.Literal(HNSW_M),
            ef_construction=sql.Literal(HNSW_EF_CONSTRUCTION),
        )
    )


async def drop_chunks_table(conn: psycopg.AsyncConnection[Any], library_id: int) -> None:
    """Drop the library's chunk table (its index goes with it)."""
    await conn.execute(_composed("vector_chunks_drop", library_id))


async def get_library(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int
) -> LibraryRecord | None:
    """Return `tenant`'s library, or None."""
    cur = await conn.execute(query("vector_library_get"), {"id": library_id, "tenant": tenant})
    row = await cur.fetchone()
    return None if row is None else _library(row)


async def lock_library(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int
) -> int | None:
    """Lock `tenant`'s library row for a delete; return its version, or None."""
    cur = await conn.execute(query("vector_library_lock"), {"id": library_id, "tenant": tenant})
    row = await cur.fetchone()
    return None if row is None else int(row[0])


async def list_libraries(
    conn: psycopg.AsyncConnection[Any], tenant: str, *, after: int, limit: int
) -> list[LibraryRecord]:
    """Return a page of `tenant`'s libraries by id, after the cursor `after`."""
    cur = await conn.execute(
        query("vector_library_list"), {"tenant": tenant, "after": after, "limit": limit}
    )
    return [_library(row) for row in await cur.fetchall()]


async def update_library(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    library_id: int,
    *,
    version: int,
    name: str | None,
    metadata: dict[str, Any] | None,
) -> LibraryRecord | None:
    """Change name and/or metadata at `version`; return None if stale or missing."""
    cur = await conn.execute(
        query("vector_library_update"),
        {
            "id": library_id,
            "tenant": tenant,
            "version": version,
            "name": name,
            "metadata": None if metadata is None else Jsonb(metadata),
        },
    )
    row = await cur.fetchone()
    return None if row is None else _library(row)


async def delete_library(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int, *, version: int
) -> bool:
    """Delete the library at `version` (its documents cascade); return whether it did."""
    cur = await conn.execute(
        query("vector_library_delete"), {"id": library_id, "tenant": tenant, "version": version}
    )
    return await cur.fetchone() is not None


async def insert_documents(
    conn: psycopg.AsyncConnection[Any],
    library_id: int,
    documents: Sequence[tuple[dict[str, Any], str | None, list[str] | None]],
) -> list[DocumentRecord]:
    """Insert (metadata, text, chunks) documents, pending; return them in input order."""
    cur = await conn.execute(
        query("vector_document_insert_many"),
        {
            "library_id": library_id,
            "metadatas": [Jsonb(m) for m, _, _ in documents],
            "bodies": [text for _, text, _ in documents],
            "chunk_lists": [None if c is None else Jsonb(c) for _, _, c in documents],
        },
    )
    return [_document(row) for row in await cur.fetchall()]


async def set_documents_batch(
    conn: psycopg.AsyncConnection[Any], batch_id: int, ids: Sequence[int], versions: Sequence[int]
) -> None:
    """Record the batch that indexes these documents at these content versions."""
    await conn.execute(
        query("vector_document_set_batch"),
        {"batch_id": batch_id, "ids": list(ids), "content_versions": list(versions)},
    )


async def get_document(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int, document_id: int
) -> DocumentRecord | None:
    """Return `tenant`'s document of that library, or None."""
    cur = await conn.execute(
        query("vector_document_get"),
        {"id": document_id, "library_id": library_id, "tenant": tenant},
    )
    row = await cur.fetchone()
    return None if row is None else _document(row)


async def list_documents(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    library_id: int,
    *,
    after: int,
    limit: int,
    status: str | None,
) -> list[DocumentRecord]:
    """Return a page of the library's documents by id (of one status, when given)."""
    cur = await conn.execute(
        query("vector_document_list"),
        {
            "library_id": library_id,
            "tenant": tenant,
            "after": after,
            "limit": limit,
            "status": status,
        },
    )
    return [_document(row) for row in await cur.fetchall()]


async def document_status_counts(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int
) -> dict[str, int]:
    """Return how many of the library's documents are in each status."""
    cur = await conn.execute(
        query("vector_document_status_counts"), {"library_id": library_id, "tenant": tenant}
    )
    return {status: int(n) for status, n in await cur.fetchall()}


async def update_document(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    library_id: int,
    document_id: int,
    *,
    version: int,
    metadata: dict[str, Any],
) -> DocumentRecord | None:
    """Replace the document's metadata at `version`; None if stale or missing."""
    cur = await conn.execute(
        query("vector_document_update"),
        {
            "id": document_id,
            "library_id": library_id,
            "tenant": tenant,
            "version": version,
            "metadata": Jsonb(metadata),
        },
    )
    row = await cur.fetchone()
    return None if row is None else _document(row)


async def reindex_documents(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    library_id: int,
    ids: Sequence[int],
    *,
    version: int | None,
    content: tuple[str | None, list[str] | None] | None,
) -> list[DocumentRecord]:
    """Bump the documents' content versions (new content if given); return those changed."""
    body, chunks = content if content is not None else (None, None)
    cur = await conn.execute(
        query("vector_document_reindex"),
        {
            "ids": sorted(ids),
            "library_id": library_id,
            "tenant": tenant,
            "version": version,
            "replace": content is not None,
            "body": body,
            "chunks": None if chunks is None else Jsonb(chunks),
        },
    )
    return sorted((_document(row) for row in await cur.fetchall()), key=lambda d: d.id)


async def delete_document(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    library_id: int,
    document_id: int,
    *,
    version: int,
) -> bool:
    """Delete the document at `version` (not its chunks); return whether it did."""
    cur = await conn.execute(
        query("vector_document_delete"),
        {"id": document_id, "library_id": library_id, "tenant": tenant, "version": version},
    )
    return await cur.fetchone() is not None


async def delete_document_chunks(
    conn: psycopg.AsyncConnection[Any], library_id: int, document_id: int
) -> None:
    """Delete a document's chunks: after its row, in the same transaction (no foreign key)."""
    await conn.execute(
        _composed("vector_chunks_delete_document", library_id), {"document_id": document_id}
    )


async def document_contents(
    conn: psycopg.AsyncConnection[Any],
    library_id: int,
    ids: Sequence[int],
    versions: Sequence[int],
) -> list[tuple[int, int, str | None, list[str] | None]]:
    """Return (id, content_version, text, chunks) of the documents still at those versions."""
    cur = await conn.execute(
        query("vector_document_content"),
        {"library_id": library_id, "ids": list(ids), "content_versions": list(versions)},
    )
    return [(int(r[0]), int(r[1]), r[2], r[3]) for r in await cur.fetchall()]


async def mark_indexing(
    conn: psycopg.AsyncConnection[Any], ids: Sequence[int], versions: Sequence[int]
) -> None:
    """Move pending documents at these versions to indexing."""
    await conn.execute(
        query("vector_document_mark_indexing"),
        {"ids": list(ids), "content_versions": list(versions)},
    )


def index_commit_statement(
    library_id: int,
    ids: Sequence[int],
    versions: Sequence[int],
    chunks: Sequence[tuple[int, int, str, str]],
) -> CommitStatement:
    """Return the at-commit statement that writes chunks (doc, seq, text, vector text)."""
    return CommitStatement(
        query("vector_index_commit"),
        {
            "library_id": library_id,
            "ids": list(ids),
            "content_versions": list(versions),
            "chunk_documents": [c[0] for c in chunks],
            "chunk_seqs": [c[1] for c in chunks],
            "chunk_texts": [c[2] for c in chunks],
            "chunk_embeddings": [c[3] for c in chunks],
        },
    )


def index_fail_statement(
    library_id: int, ids: Sequence[int], versions: Sequence[int], errors: Sequence[str]
) -> CommitStatement:
    """Return the at-commit statement that marks documents failed with their errors."""
    return CommitStatement(
        query("vector_index_fail"),
        {
            "library_id": library_id,
            "ids": list(ids),
            "content_versions": list(versions),
            "errors": list(errors),
        },
    )


async def list_chunks(
    conn: psycopg.AsyncConnection[Any], library_id: int, document_id: int, *, after: int, limit: int
) -> list[ChunkRow]:
    """Return a page of a document's chunks in order (the caller checked the tenant)."""
    cur = await conn.execute(
        _composed("vector_chunk_list", library_id),
        {"document_id": document_id, "after": after, "limit": limit},
    )
    return [ChunkRow(int(r[0]), int(r[1]), r[2]) for r in await cur.fetchall()]


async def search_settings(
    conn: psycopg.AsyncConnection[Any],
    *,
    ef_search: int,
    max_scan_tuples: int,
    statement_timeout_ms: int,
) -> None:
    """Set the HNSW scan and the statement timeout for this transaction's searches."""
    await conn.execute(
        query("vector_search_settings"),
        {
            "ef_search": str(ef_search),
            "max_scan_tuples": str(max_scan_tuples),
            "statement_timeout": str(statement_timeout_ms),
        },
    )


async def search(
    conn: psycopg.AsyncConnection[Any],
    library_id: int,
    *,
    vector_text: str,
    k: int,
    metadata_filter: dict[str, Any] | None,
    exact: bool,
) -> list[SearchRow]:
    """Return the k nearest chunks (after search_settings, in the same transaction)."""
    cur = await conn.execute(
        _composed("vector_search_exact" if exact else "vector_search_hnsw", library_id),
        {
            "query": vector_text,
            "k": k,
            "filter": None if metadata_filter is None else Jsonb(metadata_filter),
        },
    )
    return [
        SearchRow(int(r[0]), int(r[1]), int(r[2]), r[3], r[4], float(r[5]))
        for r in await cur.fetchall()
    ]


async def library_by_id(
    conn: psycopg.AsyncConnection[Any], library_id: int
) -> LibraryRecord | None:
    """Return the library whatever its tenant (for the internal indexing task), or None."""
    cur = await conn.execute(query("vector_library_by_id"), {"id": library_id})
    row = await cur.fetchone()
    return None if row is None else _library(row)


async def settle_documents(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    status: str,
    error: str,
    limit: int,
) -> tuple[int, int]:
    """Settle up to `limit` documents the batch still owns; return (candidates, settled)."""
    cur = await conn.execute(
        query("vector_document_settle"),
        {"batch_id": batch_id, "status": status, "error": error, "limit": limit},
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


async def documents_table_exists(conn: psycopg.AsyncConnection[Any]) -> bool:
    """Tell whether this database has the workload's tables (`pgbatch prune` asks)."""
    row = await (await conn.execute(query("vector_documents_exist"))).fetchone()
    return bool(row and row[0])


async def stage_import(conn: psycopg.AsyncConnection[Any]) -> None:
    """Create the import's staging table (dropped when its transaction ends)."""
    cur = await conn.execute(query("vector_import_sequence"))
    row = await cur.fetchone()
    assert row is not None and row[0] is not None
    await conn.execute(sql.SQL(query("vector_import_stage")).format(sequence=sql.Literal(row[0])))


async def copy_staged(conn: psycopg.AsyncConnection[Any], pieces: AsyncIterable[bytes]) -> None:
    """COPY pieces of COPY text (line, metadata, body, chunks) into the staging table.

    An exception raised by `pieces` (a bad line) ends the COPY and reaches the caller.
    """
    async with conn.cursor().copy(query("vector_import_copy")) as copy:
        async for piece in pieces:
            await copy.write(piece)


async def import_ranges(conn: psycopg.AsyncConnection[Any]) -> list[tuple[int, int]]:
    """Return the staged ids as runs (first, last) of consecutive values, ascending."""
    cur = await conn.execute(query("vector_import_ranges"))
    return [(int(lo), int(hi)) for lo, hi in await cur.fetchall()]


async def insert_staged(conn: psycopg.AsyncConnection[Any], library_id: int, batch_id: int) -> int:
    """Insert the staged documents, owned by `batch_id`; return how many."""
    cur = await conn.execute(
        query("vector_import_insert"), {"library_id": library_id, "batch_id": batch_id}
    )
    return cur.rowcount
