"""Encode rows for COPY in text format: items, results and rows of the user's tables."""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from operator import attrgetter
from typing import Any

import orjson
import psycopg
from psycopg import sql

from pgbatch.models import Outcome, TableRows

__all__ = [
    "EncodedResults",
    "EncodedRows",
    "copy_encoded_rows",
    "copy_table_rows",
    "encode_json",
    "encode_outcomes",
    "encode_result_rows",
    "encode_results",
    "encode_rows",
    "encode_table_rows",
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
    """Encode (seq, outcome) pairs as one row per item, as pgbatch.results was until 0009.

    benchmarks/throughput.py's results COPY ceiling is measured with these rows.
    """
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


@dataclass(frozen=True, slots=True)
class EncodedResults:
    """A shard's outcomes as stored (0009): one result block, a row per failed item.

    `outputs` is the JSON array of the outputs in seq order (null at a failed item's
    position), `errors` the COPY rows of pgbatch.result_errors, `tracebacks` the distinct
    (digest, text) those rows name. `seqs` are the outcomes' seqs: a first run's are its
    shard's contiguous range from `first_seq`; a retried shard's rerun merges at them.
    """

    first_seq: int
    seqs: tuple[int, ...]
    outputs: bytes
    errors: bytes
    tracebacks: tuple[tuple[bytes, str], ...] = ()

    def block_row(self, batch_id: int) -> bytes:
        """Return the COPY row of pgbatch.result_blocks for a first run."""
        return b"%d\t%d\t%s\n" % (batch_id, self.first_seq, self.outputs.replace(b"\\", b"\\\\"))


def encode_results(
    batch_id: int, results: Sequence[tuple[int, Outcome]], *, traced: bool = False
) -> EncodedResults | None:
    """Encode outcomes for a result block; raise TypeError if an output cannot be stored.

    `traced`: failed items keep their traceback (a failed attempt's); otherwise their
    rows name none. None when there is no outcome at all.
    """
    if not results:
        return None
    outputs = orjson.dumps([outcome.output if outcome.ok else None for _, outcome in results])
    prefix = f"{batch_id}\t".encode()
    errors = bytearray()
    texts: dict[bytes, str] = {}
    for seq, outcome in results:
        if outcome.ok:
            continue
        errors += prefix
        errors += str(seq).encode()
        errors += b"\t"
        errors += _encode_text(storable_text(outcome.error or "error"))
        if traced and outcome.traceback:
            trace = storable_text(outcome.traceback)
            digest = traceback_digest(trace)
            texts.setdefault(digest, trace)
            errors += b"\t\\\\x" + digest.hex().encode() + b"\n"
        else:
            errors += b"\t\\N\n"
    return EncodedResults(
        results[0][0],
        tuple(seq for seq, _ in results),
        outputs,
        bytes(errors),
        tuple(texts.items()),
    )


_ok_of = attrgetter("ok")
_output_of = attrgetter("output")


def encode_outcomes(
    batch_id: int, seqs: Sequence[int], outcomes: Sequence[Outcome], *, traced: bool = False
) -> tuple[EncodedResults | None, int]:
    """Encode a shard's outcomes as encode_results does, and count the ok ones.

    The same bytes and the same errors as encode_results(batch_id, zip(seqs, outcomes)),
    without a Python step per item when every outcome is ok (the common shard): one
    orjson.dumps of the outputs, and no error rows. `seqs` and `outcomes` have one entry
    per item, in seq order.
    """
    if not outcomes:
        return None, 0
    # bool(): what `if outcome.ok` tests, whatever value a handler put there.
    items_ok = sum(map(bool, map(_ok_of, outcomes)))
    if items_ok != len(outcomes):
        pairs = list(zip(seqs, outcomes, strict=True))
        return encode_results(batch_id, pairs, traced=traced), items_ok
    if len(seqs) != len(outcomes):
        raise ValueError(f"{len(seqs)} seqs for {len(outcomes)} outcomes")
    outputs = orjson.dumps(list(map(_output_of, outcomes)))
    return EncodedResults(seqs[0], tuple(seqs), outputs, b""), items_ok


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
