"""Encode rows for COPY in text format: items, results and rows of the user's tables."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import orjson
import psycopg
from psycopg import sql

from pgbatch.models import Outcome, TableRows

__all__ = [
    "EncodedRows",
    "copy_encoded_rows",
    "copy_table_rows",
    "encode_json",
    "encode_result_rows",
    "encode_rows",
    "encode_table_rows",
    "encode_traced_result_rows",
    "storable_text",
    "traceback_digest",
]

_NULL = b"\\N"
_TEXT_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def encode_json(value: Any) -> bytes:
    """Encode `value` as JSON escaped for a COPY text field (raises TypeError if it cannot)."""
    # orjson escapes every control character, so a backslash is the only byte COPY's text
    # format would misread.
    return orjson.dumps(value).replace(b"\\", b"\\\\")


def storable_text(text: str) -> str:
    """Return `text` as PostgreSQL text can hold it: NUL and lone surrogates escaped.

    Error messages and tracebacks come from any exception a handler raises; one that
    cannot be stored must still end its shard with that error, shown escaped.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


def _encode_text(value: str) -> bytes:
    return value.translate(_TEXT_ESCAPES).encode()


def _encode_field(value: Any) -> bytes:
    if value is None:
        return _NULL
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int | float):
        return str(value).encode()
    if isinstance(value, str):
        return _encode_text(value)
    if isinstance(value, datetime | date):
        return value.isoformat().encode()
    if isinstance(value, bytes):
        return b"\\\\x" + value.hex().encode()
    # dicts and lists go to json or jsonb columns
    return encode_json(value)


def encode_result_rows(batch_id: int, results: Iterable[tuple[int, Outcome]]) -> bytes:
    """Encode (seq, outcome) pairs as rows of pgbatch.results."""
    prefix = f"{batch_id}\t".encode()
    out = bytearray()
    for seq, outcome in results:
        out += prefix
        out += str(seq).encode()
        if outcome.ok:
            out += b"\tt\t"
            out += _NULL if outcome.output is None else encode_json(outcome.output)
            out += b"\t\\N\n"
        else:
            out += b"\tf\t\\N\t"
            out += _encode_text(storable_text(outcome.error or "error"))
            out += b"\n"
    return bytes(out)


def traceback_digest(text: str) -> bytes:
    """Return the 16-byte key of a traceback text in pgbatch.tracebacks (one row per text)."""
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def encode_traced_result_rows(
    batch_id: int, results: Iterable[tuple[int, Outcome]]
) -> tuple[bytes, dict[bytes, str]]:
    """Encode results with a traceback_digest column; return them and the distinct texts.

    Only a failed attempt's results go this way (result_copy_traced): a successful shard's
    COPY stays the five columns of encode_result_rows, byte for byte.
    """
    prefix = f"{batch_id}\t".encode()
    out = bytearray()
    texts: dict[bytes, str] = {}
    for seq, outcome in results:
        out += prefix
        out += str(seq).encode()
        if outcome.ok:
            out += b"\tt\t"
            out += _NULL if outcome.output is None else encode_json(outcome.output)
            out += b"\t\\N\t\\N\n"
            continue
        out += b"\tf\t\\N\t"
        out += _encode_text(storable_text(outcome.error or "error"))
        if outcome.traceback:
            trace = storable_text(outcome.traceback)
            digest = traceback_digest(trace)
            texts.setdefault(digest, trace)
            out += b"\t\\\\x" + digest.hex().encode() + b"\n"
        else:
            out += b"\t\\N\n"
    return bytes(out), texts


def encode_table_rows(rows: Iterable[Sequence[Any]]) -> bytes:
    """Encode rows of arbitrary Python values for COPY into a user's table."""
    out = bytearray()
    for row in rows:
        out += b"\t".join(_encode_field(v) for v in row)
        out += b"\n"
    return bytes(out)


@dataclass(frozen=True, slots=True)
class EncodedRows:
    """Rows for one of the user's tables, encoded for COPY."""

    table: str
    columns: tuple[str, ...]
    data: bytes


def encode_rows(rows: TableRows) -> EncodedRows:
    """Encode a handler's rows for COPY (raises TypeError if a value cannot be stored)."""
    return EncodedRows(rows.table, rows.columns, encode_table_rows(rows.rows))


async def copy_encoded_rows(
    conn: psycopg.AsyncConnection[Any], writes: Sequence[EncodedRows]
) -> None:
    """COPY rows into the user's tables: one COPY per table and column list, in name order."""
    by_table: dict[tuple[str, tuple[str, ...]], list[bytes]] = defaultdict(list)
    for write in writes:
        by_table[(write.table, write.columns)].append(write.data)
    for (table, columns), chunks in sorted(by_table.items()):
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            sql.Identifier(*table.split(".")), sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        async with conn.cursor().copy(statement) as copy:
            for chunk in chunks:
                await copy.write(chunk)


async def copy_table_rows(conn: psycopg.AsyncConnection[Any], writes: Sequence[TableRows]) -> None:
    """Encode and COPY rows into the user's tables."""
    await copy_encoded_rows(conn, [encode_rows(write) for write in writes])
