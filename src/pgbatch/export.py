"""Encode a batch's results as NDJSON or CSV, in chunks, for the HTTP API and the CLI."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterable, AsyncIterator
from typing import Literal

import orjson

from pgbatch.models import Outcome

__all__ = ["RESULT_COLUMNS", "ResultFormat", "encode_results"]

ResultFormat = Literal["ndjson", "csv"]
RESULT_COLUMNS = ("seq", "ok", "output", "error")
# A chunk is handed on once it holds this many bytes: few enough writes (or HTTP chunks)
# for a million results, little enough memory per stream.
CHUNK_BYTES = 64 * 1024


async def encode_results(
    results: AsyncIterable[tuple[int, Outcome]], result_format: ResultFormat
) -> AsyncIterator[bytes]:
    """Yield the results as NDJSON lines `{"seq", "ok", "output", "error"}` or CSV rows.

    A failed item's NDJSON line also has `"traceback"` (text, or null). CSV has a header
    row and no traceback column; `output` is its JSON text (empty for none), `ok` is
    true/false.
    """
    encode = _ndjson_line if result_format == "ndjson" else _CsvRow()
    chunk = bytearray(b"" if result_format == "ndjson" else encode(None))
    async for seq, outcome in results:
        chunk += encode((seq, outcome))
        if len(chunk) >= CHUNK_BYTES:
            yield bytes(chunk)
            chunk.clear()
    if chunk:
        yield bytes(chunk)


def _ndjson_line(row: tuple[int, Outcome] | None) -> bytes:
    assert row is not None
    seq, outcome = row
    line = {"seq": seq, "ok": outcome.ok, "output": outcome.output, "error": outcome.error}
    if not outcome.ok:
        # Failed items only: a success's line is unchanged.
        line["traceback"] = outcome.traceback
    return orjson.dumps(line) + b"\n"


class _CsvRow:
    """Encode one result as a CSV line (None: the header), through one reused writer."""

    def __init__(self) -> None:
        self._out = io.StringIO()
        self._writer = csv.writer(self._out)

    def __call__(self, row: tuple[int, Outcome] | None) -> bytes:
        if row is None:
            self._writer.writerow(RESULT_COLUMNS)
        else:
            seq, outcome = row
            output = "" if outcome.output is None else orjson.dumps(outcome.output).decode()
            self._writer.writerow(
                [seq, "true" if outcome.ok else "false", output, outcome.error or ""]
            )
        line = self._out.getvalue().encode()
        self._out.seek(0)
        self._out.truncate()
        return line
