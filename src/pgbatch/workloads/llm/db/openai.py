"""Queries of the OpenAI Batch API: request files stored in chunks, and OpenAI batches."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import IO, Any

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from pgbatch.db.database import Database
from pgbatch.db.queries import QueryMap

__all__ = [
    "FILE_CHUNK_BYTES",
    "BatchRow",
    "FileRow",
    "delete_file",
    "fail_batch",
    "file_chunks",
    "get_batch",
    "get_file",
    "insert_batch",
    "item_custom_ids",
    "list_batches",
    "list_files",
    "mark_cancelling",
    "mark_expired",
    "mark_submitted",
    "set_file_sizes",
    "store_file",
]

query = QueryMap("pgbatch.workloads.llm.db")

# A stored chunk of a file: large enough that a 1 GB file is a thousand rows and
# statements, small enough that a reader holds a few of them at once.
FILE_CHUNK_BYTES = 1024 * 1024
# Chunks fetched per round trip when a file is read (validation, GET …/content): a
# round trip per 2 MiB costs nothing beside reading them, and a reader holds ~2x that.
CHUNKS_PER_READ = 2


@dataclass(frozen=True, slots=True)
class FileRow:
    """An uploaded file as stored (its content is in chunks of its own)."""

    id: int
    tenant: str
    filename: str
    purpose: str
    bytes: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class BatchRow:
    """An OpenAI batch with its pgbatch batch's status and counters (None before submit)."""

    id: int
    tenant: str
    input_file_id: int
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None
    status: str
    errors: list[dict[str, Any]] | None
    batch_id: int | None
    request_total: int | None
    output_bytes: int | None
    error_bytes: int | None
    created_at: datetime
    in_progress_at: datetime | None
    failed_at: datetime | None
    cancelling_at: datetime | None
    expired_at: datetime | None
    run_status: str | None
    total_items: int | None
    items_ok: int | None
    items_failed: int | None
    finished_at: datetime | None


async def store_file(
    db: Database, tenant: str, filename: str, purpose: str, content: IO[bytes], size: int
) -> FileRow:
    """Store an uploaded file (a spooled temporary file) in one transaction; return its row."""

    async def work(conn: psycopg.AsyncConnection[Any]) -> FileRow:
        content.seek(0)
        cur = conn.cursor(row_factory=class_row(FileRow))
        await cur.execute(
            query("openai_file_insert"),
            {"tenant": tenant, "filename": filename, "purpose": purpose, "bytes": size},
        )
        row = await cur.fetchone()
        assert row is not None
        seq = 0
        # One statement per chunk of a MiB: the statement costs nothing beside the MiB it
        # carries, and the file is read from the spool a chunk at a time.
        while chunk := content.read(FILE_CHUNK_BYTES):
            await conn.execute(
                query("openai_file_chunk_insert"), {"file_id": row.id, "seq": seq, "data": chunk}
            )
            seq += 1
        return row

    return await db.run_in_transaction(work)


async def get_file(db: Database, tenant: str, file_id: int) -> FileRow | None:
    """Return `tenant`'s file, or None."""
    async with db.connection() as conn:
        cur = conn.cursor(row_factory=class_row(FileRow))
        await cur.execute(query("openai_file_get"), {"id": file_id, "tenant": tenant})
        return await cur.fetchone()


async def list_files(
    db: Database, tenant: str, *, after: int | None, limit: int, purpose: str | None
) -> list[FileRow]:
    """Return up to `limit` of `tenant`'s files older than `after`, newest first."""
    async with db.connection() as conn:
        cur = conn.cursor(row_factory=class_row(FileRow))
        await cur.execute(
            query("openai_file_list"),
            {"tenant": tenant, "after": after, "limit": limit, "purpose": purpose},
        )
        return await cur.fetchall()


async def delete_file(db: Database, tenant: str, file_id: int) -> bool:
    """Delete `tenant`'s file and its content; return whether there was one."""

    async def work(conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute(query("openai_file_delete"), {"id": file_id, "tenant": tenant})
        return await cur.fetchone() is not None

    return await db.run_in_transaction(work)


async def file_chunks(db: Database, tenant: str, file_id: int) -> AsyncIterator[bytes]:
    """Yield a file's content in order, a few chunks per round trip and connection."""
    after = -1
    while True:
        async with db.connection() as conn:
            cur = await conn.execute(
                query("openai_file_chunks"),
                {
                    "file_id": file_id,
                    "tenant": tenant,
                    "after_seq": after,
                    "limit": CHUNKS_PER_READ,
                },
            )
            rows = await cur.fetchall()
        for seq, data in rows:
            after = seq
            yield bytes(data)
        if len(rows) < CHUNKS_PER_READ:
            return


async def insert_batch(
    db: Database,
    tenant: str,
    *,
    input_file_id: int,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
) -> int:
    """Record a new OpenAI batch, validating; return its id."""

    async def work(conn: psycopg.AsyncConnection[Any]) -> int:
        cur = await conn.execute(
            query("openai_batch_insert"),
            {
                "tenant": tenant,
                "input_file_id": input_file_id,
                "endpoint": endpoint,
                "completion_window": completion_window,
                "metadata": Jsonb(metadata) if metadata is not None else None,
            },
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])

    return await db.run_in_transaction(work)


async def _update(db: Database, name: str, params: dict[str, Any]) -> bool:
    async def work(conn: psycopg.AsyncConnection[Any]) -> bool:
        cur = await conn.execute(query(name), params)
        return cur.rowcount > 0

    return await db.run_in_transaction(work)


async def fail_batch(
    db: Database, tenant: str, batch_id: int, errors: list[dict[str, Any]], total: int
) -> None:
    """Mark a validating batch failed with its validation errors."""
    await _update(
        db,
        "openai_batch_fail",
        {"id": batch_id, "tenant": tenant, "errors": Jsonb(errors), "total": total},
    )


async def mark_submitted(
    db: Database, tenant: str, batch_id: int, run_batch_id: int, total: int
) -> bool:
    """Link a validated batch to its pgbatch batch; False if it was no longer validating."""
    return await _update(
        db,
        "openai_batch_submitted",
        {"id": batch_id, "tenant": tenant, "batch_id": run_batch_id, "total": total},
    )


async def recover_stale(
    db: Database, tenant: str, batch_id: int, stale_s: float, errors: list[dict[str, Any]]
) -> None:
    """Resume or fail a batch left validating for `stale_s` seconds (its create died)."""
    await _update(
        db,
        "openai_batch_recover_stale",
        {"id": batch_id, "tenant": tenant, "stale_s": stale_s, "errors": Jsonb(errors)},
    )


async def mark_cancelling(db: Database, tenant: str, batch_id: int) -> None:
    """Record when a cancel was first asked for."""
    await _update(db, "openai_batch_mark_cancelling", {"id": batch_id, "tenant": tenant})


async def mark_expired(db: Database, tenant: str, batch_id: int) -> None:
    """Record when the batch outlived its completion window."""
    await _update(db, "openai_batch_mark_expired", {"id": batch_id, "tenant": tenant})


async def set_file_sizes(
    db: Database, tenant: str, batch_id: int, output_bytes: int, error_bytes: int
) -> None:
    """Store the sizes of a finished batch's output and error files."""
    await _update(
        db,
        "openai_batch_set_sizes",
        {
            "id": batch_id,
            "tenant": tenant,
            "output_bytes": output_bytes,
            "error_bytes": error_bytes,
        },
    )


async def get_batch(db: Database, tenant: str, batch_id: int) -> BatchRow | None:
    """Return `tenant`'s OpenAI batch, or None."""
    async with db.connection() as conn:
        cur = conn.cursor(row_factory=class_row(BatchRow))
        await cur.execute(query("openai_batch_get"), {"id": batch_id, "tenant": tenant})
        return await cur.fetchone()


async def list_batches(
    db: Database, tenant: str, *, after: int | None, limit: int
) -> list[BatchRow]:
    """Return up to `limit` of `tenant`'s OpenAI batches older than `after`, newest first."""
    async with db.connection() as conn:
        cur = conn.cursor(row_factory=class_row(BatchRow))
        await cur.execute(
            query("openai_batch_list"), {"tenant": tenant, "after": after, "limit": limit}
        )
        return await cur.fetchall()


async def item_custom_ids(db: Database, run_batch_id: int, seqs: Sequence[int]) -> dict[int, str]:
    """Return the custom_id of each of a pgbatch batch's requests named by seq."""
    async with db.connection() as conn:
        cur = await conn.execute(
            query("openai_item_custom_ids"), {"batch_id": run_batch_id, "seqs": list(seqs)}
        )
        return {int(seq): str(custom_id) for seq, custom_id in await cur.fetchall()}


async def run_batch_of(db: Database, batch_id: int) -> tuple[bool, int | None]:
    """Return whether the OpenAI batch exists and its pgbatch batch (None: nothing ran)."""
    async with db.connection() as conn:
        cur = await conn.execute(query("openai_batch_run_of"), {"id": batch_id})
        row = await cur.fetchone()
    return (False, None) if row is None else (True, row[0])
