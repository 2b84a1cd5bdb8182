"""Storage layout prototype (issue 13 §3): per-item rows against per-shard block rows.

Run from the repository root:

    .venv/bin/python benchmarks/layout_prototype.py [--items N] [--shard-size S]
        [--rounds R] [--database-url URL]

Raw SQL on tables shaped like pgbatch's, in a database `pgbatch_layout_<pid>` of its own,
dropped at the end. Layout "rows" is today's: one row per item in items and in results.
Layout "blocks" stores one row per shard: its items as one JSON array text, its results as
one JSON array of outputs (a failed item's position null), and each failed item as a small
row of its own (error, traceback digest). Rows are encoded before the clock starts, as
pgbatch's client encodes them, so only the server's work is timed. Each round runs both
layouts, alternating which goes first; medians are printed with the ratio to the rows
layout's results COPY, the ceiling benchmarks/throughput.py compares end to end against.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from benchmarks.harness import bench_database, connect, require_local, server_url, write_results
from pgbatch.db.copy import encode_json, encode_result_rows
from pgbatch.models import Outcome

CHUNK_ROWS = 10_000
CLAIM_SHARDS = 32  # shards per claim statement: the worker's concurrency at shard size 100
PAGE = 1000  # results per page of the export (the API's page size)
FAILED_EVERY = 100  # one failed item per this many, for the failure figures
# pgbatch's result_copy: a successful shard's COPY has no traceback column.
RESULT_COLUMNS = "(batch_id, seq, ok, output, error)"

DDL = """
CREATE TABLE items_rows (
    batch_id bigint NOT NULL, seq bigint NOT NULL, payload json NOT NULL,
    PRIMARY KEY (batch_id, seq));
CREATE TABLE results_rows (
    batch_id bigint NOT NULL, seq bigint NOT NULL, ok boolean NOT NULL, output json,
    error text, traceback_digest bytea,
    PRIMARY KEY (batch_id, seq), CHECK (ok = (error IS NULL)));
CREATE INDEX results_rows_errors_idx ON results_rows (batch_id, seq) WHERE NOT ok;
CREATE TABLE item_blocks (
    batch_id bigint NOT NULL, shard_no integer NOT NULL, payloads json NOT NULL,
    PRIMARY KEY (batch_id, shard_no));
CREATE TABLE result_blocks (
    batch_id bigint NOT NULL, shard_no integer NOT NULL, outputs json NOT NULL,
    PRIMARY KEY (batch_id, shard_no));
CREATE TABLE result_errors (
    batch_id bigint NOT NULL, seq bigint NOT NULL, error text NOT NULL,
    traceback_digest bytea, retrying boolean NOT NULL DEFAULT false,
    PRIMARY KEY (batch_id, seq));
CREATE TABLE shards (
    id bigint PRIMARY KEY, batch_id bigint NOT NULL, shard_no integer NOT NULL,
    first_seq bigint NOT NULL, last_seq bigint NOT NULL, retried boolean NOT NULL DEFAULT false);
"""

# The claim's read-back of a claimed shard's items: today's (one row per item, aggregated
# into one array text per shard) and the block's (the stored text as it is).
CLAIM_ROWS = """
SELECT c.id, i.payloads FROM shards c
CROSS JOIN LATERAL (
    SELECT '[' || string_agg(it.payload::text, ',' ORDER BY it.seq) || ']' AS payloads
    FROM items_rows it
    WHERE it.batch_id = c.batch_id AND it.seq BETWEEN c.first_seq AND c.last_seq) i
WHERE c.id = ANY(%(ids)s::bigint[]) ORDER BY c.id
"""
CLAIM_BLOCKS = """
SELECT c.id, ib.payloads::text FROM shards c
JOIN item_blocks ib ON ib.batch_id = c.batch_id AND ib.shard_no = c.shard_no
WHERE c.id = ANY(%(ids)s::bigint[]) ORDER BY c.id
"""
# A page of the export in item order: today's result_list, and the blocks covering the page
# with the failed items of the same range.
PAGE_ROWS = """
SELECT r.seq, r.ok, r.output::text, r.error FROM results_rows r
WHERE r.batch_id = 1 AND r.seq > %(after)s ORDER BY r.seq LIMIT %(limit)s
"""
PAGE_BLOCKS = """
SELECT rb.shard_no, rb.outputs::text,
       (SELECT array_agg(e.seq ORDER BY e.seq) FROM result_errors e
        WHERE e.batch_id = 1 AND e.seq BETWEEN rb.shard_no::bigint * %(size)s
                                           AND rb.shard_no::bigint * %(size)s + %(size)s - 1),
       (SELECT array_agg(e.error ORDER BY e.seq) FROM result_errors e
        WHERE e.batch_id = 1 AND e.seq BETWEEN rb.shard_no::bigint * %(size)s
                                           AND rb.shard_no::bigint * %(size)s + %(size)s - 1)
FROM result_blocks rb
WHERE rb.batch_id = 1 AND rb.shard_no >= %(after)s / %(size)s
ORDER BY rb.shard_no LIMIT %(blocks)s
"""
ERRORS_ROWS = """
SELECT r.seq, r.error FROM results_rows r
WHERE r.batch_id = 1 AND r.seq > %(after)s AND NOT r.ok ORDER BY r.seq LIMIT %(limit)s
"""
ERRORS_BLOCKS = """
SELECT e.seq, e.error FROM result_errors e
WHERE e.batch_id = 1 AND e.seq > %(after)s AND NOT e.retrying ORDER BY e.seq LIMIT %(limit)s
"""


def _items_rows(n: int) -> list[bytes]:
    def row(seq: int) -> bytes:
        return b"1\t%d\t%s\n" % (seq, encode_json({"n": seq}))

    return [
        b"".join(map(row, range(lo, min(lo + CHUNK_ROWS, n)))) for lo in range(0, n, CHUNK_ROWS)
    ]


def _results_rows(n: int, failed: bool, outputs: bool = False) -> list[bytes]:
    def outcome(seq: int) -> Outcome:
        if failed and seq % FAILED_EVERY == 0:
            return Outcome(False, None, "ValueError: bad item", None)
        return Outcome(True, {"n": seq} if outputs else None, None, None)

    return [
        encode_result_rows(1, ((seq, outcome(seq)) for seq in range(lo, min(lo + CHUNK_ROWS, n))))
        for lo in range(0, n, CHUNK_ROWS)
    ]


def _blocks(n: int, size: int, cell: Callable[[int], bytes]) -> list[bytes]:
    """Encode one row per shard: (batch_id, shard_no, JSON array of cell(seq))."""
    rows_per_chunk = max(1, CHUNK_ROWS // size)
    shards = (n + size - 1) // size
    chunks = []
    for lo in range(0, shards, rows_per_chunk):
        out = bytearray()
        for shard in range(lo, min(lo + rows_per_chunk, shards)):
            seqs = range(shard * size, min((shard + 1) * size, n))
            out += b"1\t%d\t[%s]\n" % (shard, b",".join(cell(seq) for seq in seqs))
        chunks.append(bytes(out))
    return chunks


def _item_blocks(n: int, size: int) -> list[bytes]:
    return _blocks(n, size, lambda seq: encode_json({"n": seq}))


def _result_blocks(n: int, size: int, outputs: bool = False) -> list[bytes]:
    if outputs:
        return _blocks(n, size, lambda seq: encode_json({"n": seq}))
    return _blocks(n, size, lambda seq: b"null")


def _error_rows(n: int) -> list[bytes]:
    return [b"1\t%d\tValueError: bad item\t\\N\tf\n" % seq for seq in range(0, n, FAILED_EVERY)]


async def _copy(
    conninfo: str, table: str, chunks: list[bytes], columns: str = ""
) -> dict[str, float]:
    """COPY pre-encoded chunks into `table` (truncated first) in one transaction; time it."""
    async with await connect(conninfo) as conn:
        await conn.execute(f"TRUNCATE {table}")
        lsn = await (await conn.execute("SELECT pg_current_wal_lsn()")).fetchone()
        assert lsn is not None
        started = time.perf_counter()
        async with conn.transaction():
            async with conn.cursor().copy(f"COPY {table} {columns} FROM STDIN") as copy:
                for chunk in chunks:
                    await copy.write(chunk)
        elapsed = time.perf_counter() - started
        row = await (
            await conn.execute(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s), pg_total_relation_size(%s)",
                (lsn[0], table),
            )
        ).fetchone()
        assert row is not None
    return {"seconds": elapsed, "wal_bytes": float(row[0]), "bytes": float(row[1])}


async def _timed(
    conninfo: str, work: Callable[[Any], Coroutine[Any, Any, int]]
) -> dict[str, float]:
    async with await connect(conninfo) as conn:
        started = time.perf_counter()
        count = await work(conn)
        return {"seconds": time.perf_counter() - started, "count": float(count)}


async def _claim_all(conn: Any, statement: str, shards: int) -> int:
    """Read back every shard's items, CLAIM_SHARDS per statement, decoding them as the worker."""
    items = 0
    for lo in range(0, shards, CLAIM_SHARDS):
        cur = await conn.execute(
            statement, {"ids": list(range(lo, min(lo + CLAIM_SHARDS, shards)))}, prepare=True
        )
        for _, payloads in await cur.fetchall():
            items += len(orjson.loads(payloads))
    return items


async def _export_rows(conn: Any) -> int:
    after, got = -1, 0
    while True:
        cur = await conn.execute(PAGE_ROWS, {"after": after, "limit": PAGE}, prepare=True)
        rows = await cur.fetchall()
        if not rows:
            return got
        for seq, _ok, output, _error in rows:
            _ = None if output is None else orjson.loads(output)
            after = seq
        got += len(rows)


async def _export_blocks(conn: Any, size: int) -> int:
    after, got = 0, 0
    blocks = max(1, PAGE // size)
    while True:
        cur = await conn.execute(
            PAGE_BLOCKS, {"after": after, "size": size, "blocks": blocks}, prepare=True
        )
        rows = await cur.fetchall()
        if not rows:
            return got
        for shard_no, outputs, err_seqs, _errors in rows:
            failed = set(err_seqs or ())
            first = shard_no * size
            for pos, _output in enumerate(orjson.loads(outputs)):
                _ = (first + pos) in failed
                got += 1
            after = first + size


async def _errors(conn: Any, statement: str) -> int:
    after, got = -1, 0
    while True:
        cur = await conn.execute(statement, {"after": after, "limit": PAGE}, prepare=True)
        rows = await cur.fetchall()
        if not rows:
            return got
        after = rows[-1][0]
        got += len(rows)


async def run(url: str, n: int, size: int, rounds: int) -> dict[str, Any]:
    """Measure both layouts `rounds` times, interleaved; return every sample."""
    shards = (n + size - 1) // size
    encoded = {
        "items_rows": _items_rows(n),
        "results_rows": _results_rows(n, failed=False),
        "results_rows_failed": _results_rows(n, failed=True),
        "item_blocks": _item_blocks(n, size),
        "result_blocks": _result_blocks(n, size),
        "results_rows_outputs": _results_rows(n, failed=False, outputs=True),
        "result_blocks_outputs": _result_blocks(n, size, outputs=True),
        "result_errors": _error_rows(n),
    }
    samples: dict[str, list[dict[str, float]]] = {}

    async with bench_database(url, "pgbatch_layout") as conninfo:
        async with await connect(conninfo) as conn:
            await conn.execute(DDL)
            await conn.execute(
                "INSERT INTO shards SELECT g, 1, g, g::bigint * %(s)s,"
                " least((g + 1)::bigint * %(s)s, %(n)s) - 1 FROM generate_series(0, %(k)s - 1) g",
                {"s": size, "n": n, "k": shards},
            )
        rc = RESULT_COLUMNS
        steps: dict[str, list[tuple[str, Callable[[], Coroutine[Any, Any, dict[str, float]]]]]] = {
            "rows": [
                ("copy_items_rows", lambda: _copy(conninfo, "items_rows", encoded["items_rows"])),
                ("copy_results_rows",
                 lambda: _copy(conninfo, "results_rows", encoded["results_rows"], rc)),
                ("claim_rows",
                 lambda: _timed(conninfo, lambda c: _claim_all(c, CLAIM_ROWS, shards))),
                ("export_rows", lambda: _timed(conninfo, _export_rows)),
                ("copy_results_rows_1pct_failed",
                 lambda: _copy(conninfo, "results_rows", encoded["results_rows_failed"], rc)),
                ("errors_rows", lambda: _timed(conninfo, lambda c: _errors(c, ERRORS_ROWS))),
                ("copy_results_rows_outputs",
                 lambda: _copy(conninfo, "results_rows", encoded["results_rows_outputs"], rc)),
            ],
            "blocks": [
                ("copy_item_blocks",
                 lambda: _copy(conninfo, "item_blocks", encoded["item_blocks"])),
                ("copy_result_blocks",
                 lambda: _copy(conninfo, "result_blocks", encoded["result_blocks"])),
                ("claim_blocks",
                 lambda: _timed(conninfo, lambda c: _claim_all(c, CLAIM_BLOCKS, shards))),
                ("copy_result_errors_1pct",
                 lambda: _copy(conninfo, "result_errors", encoded["result_errors"])),
                ("export_blocks", lambda: _timed(conninfo, lambda c: _export_blocks(c, size))),
                ("errors_blocks", lambda: _timed(conninfo, lambda c: _errors(c, ERRORS_BLOCKS))),
                ("copy_result_blocks_outputs",
                 lambda: _copy(conninfo, "result_blocks", encoded["result_blocks_outputs"])),
            ],
        }  # fmt: skip
        for r in range(rounds):
            for layout in ("rows", "blocks") if r % 2 == 0 else ("blocks", "rows"):
                for name, step in steps[layout]:
                    samples.setdefault(name, []).append(await step())
                print(f"round {r + 1} {layout} done", flush=True)
    return {"items": n, "shard_size": size, "rounds": rounds, "samples": samples}  # fmt: skip


def _report(data: dict[str, Any]) -> None:
    n = data["items"]
    med = {
        name: {f: statistics.median(s[f] for s in runs) for f in runs[0]}
        for name, runs in data["samples"].items()
    }
    ceiling = n / med["copy_results_rows"]["seconds"]

    def rate(name: str) -> float:
        return n / med[name]["seconds"]

    print(f"\n{n:,} items, shard size {data['shard_size']}, medians of {data['rounds']} rounds")
    print(f"{'figure':34} {'items/s':>12} {'x results COPY':>15} {'MB':>8} {'WAL MB':>8}")
    for name in ("copy_items_rows", "copy_results_rows", "copy_results_rows_1pct_failed",
                 "copy_results_rows_outputs", "copy_item_blocks", "copy_result_blocks",
                 "copy_result_blocks_outputs"):  # fmt: skip
        m = med[name]
        print(f"{name:34} {rate(name):12,.0f} {rate(name) / ceiling:15.2f} "
              f"{m['bytes'] / 1e6:8.1f} {m['wal_bytes'] / 1e6:8.1f}")  # fmt: skip
    m = med["copy_result_errors_1pct"]
    print(f"{'copy_result_errors_1pct':34} {'':>12} {'':>15} {m['bytes'] / 1e6:8.1f} "
          f"{m['wal_bytes'] / 1e6:8.1f}  "
          f"({n // FAILED_EVERY:,} rows, {m['seconds'] * 1e3:.0f} ms)")  # fmt: skip
    for name in ("claim_rows", "claim_blocks", "export_rows", "export_blocks",
                 "errors_rows", "errors_blocks"):  # fmt: skip
        m = med[name]
        print(f"{name:34} {m['seconds']:9.3f} s for {m['count']:,.0f} items "
              f"({m['seconds'] / max(m['count'], 1) * 1e6:.2f} us/item)")  # fmt: skip
    for layout, (items, results) in {
        "rows": ("copy_items_rows", "copy_results_rows"),
        "blocks": ("copy_item_blocks", "copy_result_blocks"),
    }.items():
        bound = 1 / (1 / rate(items) + 1 / rate(results))
        print(f"both COPYs back to back, {layout:6}: {bound:12,.0f} items/s = "
              f"{bound / ceiling:.2f} x the results COPY")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run, print the medians and write benchmarks/results/layout.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    url = server_url(args.database_url)
    require_local(url)
    data = asyncio.run(run(url, args.items, args.shard_size, args.rounds))
    write_results("layout", data)
    _report(data)
    print(json.dumps({"written": "benchmarks/results/layout.json"}))


if __name__ == "__main__":
    main()
