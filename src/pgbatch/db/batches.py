"""Queries on batches: submit (items streamed with COPY), read, cancel, retry, priority."""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import AsyncIterable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import psycopg
from psycopg.rows import dict_row

from pgbatch import json_values
from pgbatch.db.copy import encode_json
from pgbatch.db.queries import query
from pgbatch.db.retention import tombstone
from pgbatch.errors import (
    BatchNotFoundError,
    BatchPrunedError,
    IdempotencyConflictError,
    InvalidBatchError,
    InvalidStateError,
    ItemNotSerializableError,
    ShardTooLargeError,
    StaleVersionError,
)
from pgbatch.labels import LabelChange
from pgbatch.limits import DEFAULT_MAX_SHARD_BYTES
from pgbatch.models import (
    Batch,
    BatchFilter,
    BatchInsight,
    BatchStatus,
    ShardFailure,
    ShardStatus,
    check_batch_id,
)

__all__ = [
    "BatchSpec",
    "SubmitResult",
    "batch_insight",
    "cancel_batch",
    "get_batch",
    "get_batches",
    "last_shard_failure",
    "list_batches",
    "missing_batch",
    "requeue_failed",
    "set_labels",
    "set_priority",
    "submit_batch",
]

# Items are encoded and sent to COPY in chunks of this many rows: big enough that the
# per-write cost vanishes, small enough that a 10-million-item batch never sits in memory
# (orjson's output buffers start at ~1 KB each, so a chunk peaks at about 1 MB per 500).
COPY_CHUNK_ITEMS = 500
# ...and of about this many bytes: a chunk of 500 requests of 100 KB each (long LLM
# prompts) held ~400 MB while encoded. The first chunk is small, and each next one is
# sized from the bytes per item seen so far.
COPY_CHUNK_BYTES = 4 * 2**20
FIRST_CHUNK_ITEMS = 8
# A list or tuple this short is sent in one statement (one round trip, the commit
# included) instead of a COPY: what matters for small batches is latency, and COPY costs
# four round trips.
SMALL_BATCH_ITEMS = 1_000


@dataclass(frozen=True, slots=True)
class BatchSpec:
    """What a client submits besides the items."""

    task: str
    shard_size: int
    max_attempts: int
    lease_ttl_s: float
    queue: str = "default"
    priority: int = 0
    on_complete: str | None = None
    idempotency_key: str | None = None
    # Not part of the fingerprint: an idempotency key is already scoped to its tenant.
    tenant: str = "default"
    # A bound of this server, not an option of the batch: not part of the fingerprint.
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
    # Labels, not payload: not part of the fingerprint (a repeat with the same key returns
    # the batch with the labels it was first given).
    name: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Seconds after it finishes until the batch is pruned; None keeps it. Not part of the
    # fingerprint: how long to keep a result is not what was asked.
    retention_s: float | None = None

    def fingerprint(self) -> bytes:
        """Encode the options that make two submissions "the same payload"."""
        return encode_json(
            [
                self.task,
                self.shard_size,
                self.max_attempts,
                self.lease_ttl_s,
                self.queue,
                self.priority,
                self.on_complete,
            ]
        )


@dataclass(frozen=True, slots=True)
class SubmitResult:
    """The batch a submission produced, and whether this call created it."""

    batch_id: int
    created: bool
    batch: Batch | None = None  # the batch as committed, when this call created it


class _ItemEncoder:
    """Turn items into COPY rows while hashing them, so the payload is read only once."""

    def __init__(self, batch_id: int, spec: BatchSpec) -> None:
        self.batch_id = batch_id
        self.count = 0
        self.digest = hashlib.sha256(spec.fingerprint())
        self.shard_size = spec.shard_size
        self.max_shard_bytes = spec.max_shard_bytes
        self._measured = 0  # items counted into shard sizes so far
        self._shard_bytes = 0  # bytes of the shard the next item belongs to, so far

    def payloads(self, items: Sequence[Any]) -> list[bytes]:
        """Encode items as JSON and add them to the payload hash."""
        return self._payloads(items)[0]

    def _payloads(self, items: Sequence[Any]) -> tuple[list[bytes], bytes]:
        """Return the items' JSON, and it joined by newlines (what the hash covers)."""
        try:
            payloads = list(map(orjson.dumps, items))
        except TypeError:
            self._raise_for_first_bad(items)
            raise
        # orjson escapes newlines, so a search of the joined text is a search of each
        # payload: one C scan per chunk instead of a Python step per item.
        joined = b"\n".join(payloads)
        # orjson writes NaN and ±Infinity as null: only an item whose JSON holds a null
        # can hide one, so only those are walked (a null in a string costs a walk, no more).
        if b"null" in joined:
            for offset, payload in enumerate(payloads):
                if b"null" in payload:
                    self._check_value(items[offset], self.count + offset)
        self._measure(payloads)
        # The hash covers each payload and a newline, whatever the chunk boundaries.
        self.digest.update(joined)
        self.digest.update(b"\n")
        return payloads, joined

    def _measure(self, payloads: Sequence[bytes]) -> None:
        """Add payloads to their shards' sizes; raise ShardTooLargeError past the bound.

        A shard's size is what the claim builds from it: its payloads and a comma each.
        One sum per shard segment of the chunk, not a Python step per item.
        """
        start = 0
        while start < len(payloads):
            offset = self._measured % self.shard_size
            if offset == 0:
                self._shard_bytes = 0
            end = min(len(payloads), start + self.shard_size - offset)
            segment = payloads[start:end]
            self._shard_bytes += sum(map(len, segment)) + len(segment)
            self._measured += len(segment)
            if self._shard_bytes > self.max_shard_bytes:
                shard_no = (self._measured - 1) // self.shard_size
                limit = self.max_shard_bytes
                raise ShardTooLargeError(
                    f"shard {shard_no} (items from {shard_no * self.shard_size}) holds more "
                    f"than {limit} bytes of JSON (limit {limit}, PGBATCH_MAX_SHARD_BYTES): "
                    "submit with a smaller shard_size",
                    limit_bytes=limit,
                    shard_no=shard_no,
                )
            start = end

    def encode(self, items: list[Any]) -> bytes:
        """Encode one chunk of items as COPY bytes of item blocks, from the running count.

        One row per shard (`batch_id, first_seq, [payloads]`): a shard that spans chunks
        is continued in the next one (COPY is a stream), and `finish` closes the last.
        """
        payloads, joined = self._payloads(items)
        if b"\\" in joined:
            # COPY's text format reads a backslash as an escape: double them.
            payloads = [p.replace(b"\\", b"\\\\") for p in payloads]
        out = bytearray()
        start, size = 0, self.shard_size
        while start < len(payloads):
            offset = self.count % size
            end = min(len(payloads), start + size - offset)
            if offset == 0:
                if self.count:
                    out += b"]\n"
                out += b"%d\t%d\t[" % (self.batch_id, self.count)
            else:
                out += b","
            out += b",".join(payloads[start:end])
            self.count += end - start
            start = end
        return bytes(out)

    def finish(self) -> bytes:
        """Return the bytes that close the last item block (none for an empty batch)."""
        return b"]\n" if self.count else b""

    def _raise_for_first_bad(self, items: Sequence[Any]) -> None:
        for offset, item in enumerate(items):
            try:
                orjson.dumps(item)
            except TypeError as exc:
                seq = self.count + offset
                self._check_value(item, seq)  # an integer beyond 64 bits: name where
                raise ItemNotSerializableError(
                    f"item {seq} cannot be stored as JSON: {exc}", seq=seq
                ) from None

    @staticmethod
    def _check_value(item: Any, seq: int) -> None:
        try:
            json_values.check_value(item, ("items", seq))
        except json_values.JsonValueError as exc:
            raise ItemNotSerializableError(
                f"item {seq} cannot be stored as JSON: {exc}",
                seq=seq,
                field=json_values.field_of(exc.path),
            ) from None


async def _chunks(items: Iterable[Any] | AsyncIterable[Any], encoder: _ItemEncoder) -> Any:
    sent_bytes = sent_items = 0
    size = FIRST_CHUNK_ITEMS

    def encoded(buffer: list[Any]) -> bytes:
        nonlocal sent_bytes, sent_items, size
        chunk = encoder.encode(buffer)
        sent_bytes += len(chunk)
        sent_items += len(buffer)
        per_item = max(1, sent_bytes // sent_items)
        size = max(1, min(COPY_CHUNK_ITEMS, COPY_CHUNK_BYTES // per_item))
        return chunk

    buffer: list[Any] = []
    if isinstance(items, AsyncIterable):
        async for item in items:
            buffer.append(item)
            if len(buffer) >= size:
                yield encoded(buffer)
                buffer = []
    else:
        iterator = iter(items)
        while buffer := list(itertools.islice(iterator, size)):
            yield encoded(buffer)
        return
    if buffer:
        yield encoded(buffer)


async def _hash_only(items: Iterable[Any] | AsyncIterable[Any], spec: BatchSpec) -> bytes:
    encoder = _ItemEncoder(0, spec)
    async for _ in _chunks(items, encoder):
        pass
    return encoder.digest.digest()


async def submit_batch(
    conn: psycopg.AsyncConnection[Any],
    spec: BatchSpec,
    items: Iterable[Any] | AsyncIterable[Any],
) -> SubmitResult:
    """Write a batch, its items and its shards in one transaction, or nothing at all."""
    if isinstance(items, list | tuple) and len(items) <= SMALL_BATCH_ITEMS:
        return await _submit_small(conn, spec, items)
    async with conn.transaction():
        row = await (await conn.execute(query("batch_insert"), _spec_params(spec))).fetchone()
        if row is None:
            return await _resolve_idempotent(conn, spec, items)
        batch_id: int = row[0]
        encoder = _ItemEncoder(batch_id, spec)
        try:
            async with conn.cursor().copy(query("item_copy")) as copy:
                async for chunk in _chunks(items, encoder):
                    await copy.write(chunk)
                await copy.write(encoder.finish())
        except psycopg.errors.DataError as exc:
            raise InvalidBatchError(
                f"an item cannot be stored as JSON: {exc.diag.message_primary}", field="items"
            ) from None
        total_items = encoder.count
        async with conn.cursor(row_factory=dict_row) as cur:
            await cur.execute(
                query("batch_seal"),
                {
                    "batch_id": batch_id,
                    "total_items": total_items,
                    "total_shards": -(-total_items // spec.shard_size),
                    "payload_hash": encoder.digest.digest(),
                },
            )
            row = await cur.fetchone()
        assert row is not None
    return SubmitResult(batch_id, created=True, batch=_sealed_batch(row))


async def _submit_small(
    conn: psycopg.AsyncConnection[Any], spec: BatchSpec, items: Sequence[Any]
) -> SubmitResult:
    encoder = _ItemEncoder(0, spec)
    payloads = encoder.payloads(items)
    size = spec.shard_size
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            query("batch_submit_small"),
            {
                **_spec_params(spec),
                # One item block per shard, as the COPY path writes them.
                "first_seqs": list(range(0, len(payloads), size)),
                "blocks": [
                    (b"[" + b",".join(payloads[at : at + size]) + b"]").decode()
                    for at in range(0, len(payloads), size)
                ],
                "total_items": len(payloads),
                "total_shards": -(-len(payloads) // spec.shard_size),
                "payload_hash": encoder.digest.digest(),
            },
        )
        row = await cur.fetchone()
    if row is None:
        return await _resolve_idempotent(conn, spec, items)
    batch = _sealed_batch(row)
    return SubmitResult(batch.id, created=True, batch=batch)


def _sealed_batch(row: dict[str, Any]) -> Batch:
    # batch_seal and batch_submit_small add columns that only make their NOTIFYs happen.
    return batch_from_row({k: v for k, v in row.items() if not k.startswith("notified_")})


async def _resolve_idempotent(
    conn: psycopg.AsyncConnection[Any],
    spec: BatchSpec,
    items: Iterable[Any] | AsyncIterable[Any],
) -> SubmitResult:
    existing = await (
        await conn.execute(
            query("batch_get_by_idempotency_key"),
            {"tenant": spec.tenant, "idempotency_key": spec.idempotency_key},
        )
    ).fetchone()
    if existing is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
        raise InvalidStateError("idempotency key conflict but no batch holds it")
    batch_id, stored_hash = existing
    if bytes(stored_hash) != await _hash_only(items, spec):
        raise IdempotencyConflictError(
            f"idempotency key {spec.idempotency_key!r} was used by batch {batch_id} "
            "with a different payload",
            batch_id=batch_id,
        )
    return SubmitResult(batch_id, created=False)


def _spec_params(spec: BatchSpec) -> dict[str, Any]:
    return {
        "tenant": spec.tenant,
        "task": spec.task,
        "queue": spec.queue,
        "priority": spec.priority,
        "shard_size": spec.shard_size,
        "max_attempts": spec.max_attempts,
        "lease_ttl_s": spec.lease_ttl_s,
        "on_complete": spec.on_complete,
        "idempotency_key": spec.idempotency_key,
        "name": spec.name,
        "metadata": orjson.dumps(dict(spec.metadata)).decode(),
        "retention_s": spec.retention_s,
    }


async def missing_batch(
    conn: psycopg.AsyncConnection[Any], batch_id: int, *, tenant: str | None = None
) -> BatchNotFoundError:
    """Return the error for a batch id with no row: pruned (with when), or never there."""
    pruned = await tombstone(conn, batch_id, tenant=tenant)
    if pruned is None:
        return BatchNotFoundError(f"no batch with id {batch_id}")
    return BatchPrunedError(
        f"batch {batch_id} was pruned at {pruned.pruned_at.isoformat()} "
        f"(it finished at {pruned.finished_at.isoformat()}, and its retention period ended)",
        batch_id=batch_id,
        pruned_at=pruned.pruned_at,
    )


def batch_from_row(row: dict[str, Any]) -> Batch:
    """Build a Batch from a row of `batch_get`."""
    return Batch(**{**row, "status": BatchStatus(row["status"])})


async def get_batch(
    conn: psycopg.AsyncConnection[Any], batch_id: int, *, tenant: str | None = None
) -> Batch:
    """Return the batch (of `tenant`, when given), or raise BatchNotFoundError."""
    check_batch_id(batch_id)
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("batch_get"), {"batch_id": batch_id, "tenant": tenant})
        row = await cur.fetchone()
    if row is None:
        raise await missing_batch(conn, batch_id, tenant=tenant)
    return batch_from_row(row)


async def get_batches(conn: psycopg.AsyncConnection[Any], batch_ids: Sequence[int]) -> list[Batch]:
    """Return the batches with these ids (of any tenant; unknown ids are skipped)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("batch_get_many"), {"batch_ids": list(batch_ids)})
        return [batch_from_row(row) for row in await cur.fetchall()]


async def list_batches(
    conn: psycopg.AsyncConnection[Any], where: BatchFilter | None = None, *, limit: int = 20
) -> list[Batch]:
    """Return the batches matching `where`, newest first."""
    where = where or BatchFilter()
    params = {
        "tenant": where.tenant,
        "status": None if where.status is None else str(where.status),
        "task": where.task,
        "name": where.name,
        "metadata": orjson.dumps(where.metadata).decode() if where.metadata else None,
        "created_after": where.created_after,
        "created_before": where.created_before,
        "before_id": where.before_id,
        "limit": limit,
    }
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(query("batch_list"), params)
        return [batch_from_row(row) for row in await cur.fetchall()]


async def batch_insight(
    conn: psycopg.AsyncConnection[Any], batch: Batch, *, samples: int = 10
) -> BatchInsight:
    """Return shard states, items finished over time and error samples of `batch`."""
    # A batch that counts cancelled items apart shows them apart, not among its errors.
    params = {"batch_id": batch.id, "limit": samples, "skip_cancelled": batch.items_cancelled > 0}
    rows = await (await conn.execute(query("batch_shard_states"), params)).fetchall()
    states = {str(status): int(count) for status, count in rows}
    # About 60 buckets over the batch's life so far, never finer than a second.
    end = batch.finished_at or datetime.now(UTC)
    span_s = (end - (batch.started_at or batch.created_at)).total_seconds()
    bucket_s = max(1, math.ceil(span_s / 60))
    rows = await (
        await conn.execute(query("batch_throughput"), {**params, "bucket_s": bucket_s})
    ).fetchall()
    throughput = [(bucket, int(items)) for bucket, items in rows]
    errors: list[tuple[int, str]] = []
    # Skipped when nothing failed: the scan would read every result of a clean batch.
    if batch.items_failed:
        rows = await (await conn.execute(query("batch_error_samples"), params)).fetchall()
        errors = [(int(seq), str(message)) for seq, message in rows]
    dead: list[tuple[int, int, int, str | None]] = []
    dead_tracebacks: dict[int, str] = {}
    if batch.shards_dead:
        rows = await (await conn.execute(query("batch_dead_shard_samples"), params)).fetchall()
        dead = [(int(a), int(b), int(c), d) for a, b, c, d in rows]
        cur = await conn.execute(
            query("shard_dead_tracebacks"),
            {"batch_id": batch.id, "shard_nos": [shard_no for shard_no, *_ in dead]},
        )
        dead_tracebacks = {int(n): str(tb) for n, tb in await cur.fetchall()}
    return BatchInsight(
        states,
        throughput,
        bucket_s,
        errors,
        dead,
        await last_shard_failure(conn, batch.id),
        dead_tracebacks,
    )


async def last_shard_failure(
    conn: psycopg.AsyncConnection[Any], batch_id: int
) -> ShardFailure | None:
    """Return the batch's most recent shard failure still on record, with its traceback."""
    cur = await conn.execute(query("shard_last_failure"), {"batch_id": batch_id})
    row = await cur.fetchone()
    if row is None:
        return None
    shard_no, status, first_seq, last_seq, message, traceback, at = row
    return ShardFailure(
        int(shard_no), ShardStatus(status), int(first_seq), int(last_seq), message, traceback, at
    )


async def _lock_batch(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    expected_version: int | None,
    tenant: str | None,
) -> tuple[BatchStatus, bool]:
    check_batch_id(batch_id)
    row = await (
        await conn.execute(query("batch_get_for_update"), {"batch_id": batch_id, "tenant": tenant})
    ).fetchone()
    if row is None:
        raise await missing_batch(conn, batch_id, tenant=tenant)
    _, status, version, finished = row
    if expected_version is not None and version != expected_version:
        raise StaleVersionError(
            f"batch {batch_id} is at version {version}, not {expected_version}",
            current_version=version,
        )
    return BatchStatus(status), finished


async def cancel_batch(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    expected_version: int | None = None,
    tenant: str | None = None,
) -> bool:
    """Cancel a batch (in the caller's transaction); return False if it had already ended."""
    status, _ = await _lock_batch(conn, batch_id, expected_version, tenant)
    if status.is_final:
        return False
    await conn.execute(query("batch_mark_cancelled"), {"batch_id": batch_id})
    row = await (
        await conn.execute(query("batch_cancel_queued_shards"), {"batch_id": batch_id})
    ).fetchone()
    assert row is not None
    shards, items = row
    # Counting the cancelled shards goes through the same statement as completions, so
    # the transaction that makes shards_done reach the total is the one that finishes it.
    await conn.execute(
        query("batch_add_progress"),
        {
            "batch_ids": [batch_id],
            "shards": [shards],
            "dead": [0],
            "ok": [0],
            "failed": [0],
            "cancelled": [items],
        },
    )
    await conn.execute(query("callback_notify"))
    return True


async def requeue_failed(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    *,
    expected_version: int | None = None,
    tenant: str | None = None,
) -> int:
    """Re-queue the batch's dead shards and shards with item errors; return how many."""
    status, _ = await _lock_batch(conn, batch_id, expected_version, tenant)
    if status is BatchStatus.CANCELLED:
        raise InvalidStateError(f"batch {batch_id} is cancelled; it cannot be retried")
    row = await (
        await conn.execute(query("batch_requeue_failed_shards"), {"batch_id": batch_id})
    ).fetchone()
    assert row is not None
    shards, dead, items, _ = row
    if shards == 0:
        return 0
    await conn.execute(
        query("batch_reopen"),
        {"batch_id": batch_id, "shards": shards, "dead": dead, "items": items},
    )
    return int(shards)


async def set_priority(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    priority: int,
    *,
    expected_version: int | None = None,
    tenant: str | None = None,
) -> int:
    """Change the batch's priority (and its queued shards'); return the new version."""
    await _lock_batch(conn, batch_id, expected_version, tenant)
    row = await (
        await conn.execute(
            query("batch_set_priority"), {"batch_id": batch_id, "priority": priority}
        )
    ).fetchone()
    assert row is not None
    return int(row[0])


async def set_labels(
    conn: psycopg.AsyncConnection[Any],
    batch_id: int,
    change: LabelChange,
    *,
    expected_version: int | None = None,
    tenant: str | None = None,
) -> int:
    """Change the batch's name and/or metadata (any status); return the new version."""
    await _lock_batch(conn, batch_id, expected_version, tenant)
    params = {
        "batch_id": batch_id,
        "set_name": change.set_name,
        "name": change.name,
        "metadata": None
        if change.metadata is None
        else orjson.dumps(dict(change.metadata)).decode(),
    }
    row = await (await conn.execute(query("batch_set_labels"), params)).fetchone()
    assert row is not None
    return int(row[0])
