"""HNSW build settings against recall: pgvector's m / ef_construction / ef_search, measured.

Run from the repository root (the embedded server has pgvector):

    .venv/bin/python benchmarks/vectors_tune.py [--chunks 100000] [--queries 100]
        [--data mixture isotropic] [--builds 16:64 16:128 24:128] [--ef-search 40 100 200]

For each data kind (benchmarks/vector_data.py): all vectors go into a table without an
index, and the exact top 10 of each query comes from a sequential scan of it (the
truth). For each build `m:ef_construction`, a table of the first `chunks - inserts`
vectors gets its HNSW index by CREATE INDEX (timed: the bulk build), then the last
`--inserts` vectors are inserted one statement for all (timed: the per-row cost a
library pays, whose index exists from its creation and grows row by row); then recall@10
and p50 latency at each `hnsw.ef_search`. Bare tables (id, embedding): no join, no
filter, so the figures are the index's own.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from benchmarks.harness import bench_database, connect, percentile, require_local, server_url
from benchmarks.vector_data import KINDS, Topics

DIM = 384
K = 10


def _text(vector: list[float]) -> str:
    return "[" + ",".join(f"{x:.6f}" for x in vector) + "]"


async def _load(conn: psycopg.AsyncConnection[Any], table: list[list[float]]) -> None:
    await conn.execute("DROP TABLE IF EXISTS base, t")
    await conn.execute(f"CREATE TABLE base (id integer PRIMARY KEY, embedding vector({DIM}))")
    async with conn.cursor() as cur:
        async with cur.copy("COPY base FROM STDIN") as copy:
            for n, vector in enumerate(table):
                await copy.write_row((n, _text(vector)))
    await conn.execute("VACUUM ANALYZE base")


async def _top(conn: psycopg.AsyncConnection[Any], table: str, query: str) -> list[int]:
    cur = await conn.execute(
        f"SELECT id FROM {table} ORDER BY embedding <=> %s::vector LIMIT {K}",
        (query,),
    )
    return [int(r[0]) for r in await cur.fetchall()]


async def run_kind(
    conninfo: str, kind: str, args: argparse.Namespace, builds: list[tuple[int, int]]
) -> None:
    """Measure every build and ef_search on one data kind."""
    topics = Topics(kind, random.Random(11), dim=DIM, topics=100, noise=args.noise)
    started = time.perf_counter()
    table = topics.draw(args.chunks)
    queries = [_text(q) for q in topics.draw(args.queries, queries=True)]
    print(f"[{kind}] {args.chunks:,} vectors made in {time.perf_counter() - started:.0f} s")
    async with await connect(conninfo) as conn:
        await conn.execute("SET maintenance_work_mem = '1GB'")
        await _load(conn, table)
        exact_times, truth = [], []
        for q in queries:
            started = time.perf_counter()
            truth.append(set(await _top(conn, "base", q)))
            exact_times.append(time.perf_counter() - started)
        print(f"[{kind}] exact (sequential scan) p50 {percentile(exact_times, 50) * 1000:.1f} ms")
        first = args.chunks - args.inserts
        for m, efc in builds:
            await conn.execute("DROP TABLE IF EXISTS t")
            await conn.execute(f"CREATE TABLE t AS SELECT * FROM base WHERE id < {first}")
            started = time.perf_counter()
            await conn.execute(
                f"CREATE INDEX t_hnsw ON t USING hnsw (embedding vector_cosine_ops)"
                f" WITH (m = {m}, ef_construction = {efc})"
            )
            build = time.perf_counter() - started
            started = time.perf_counter()
            await conn.execute(f"INSERT INTO t SELECT * FROM base WHERE id >= {first}")
            per_row = (time.perf_counter() - started) / max(1, args.inserts)
            print(
                f"[{kind}] m={m} ef_construction={efc}: CREATE INDEX on {first:,} rows "
                f"{build:.1f} s; inserting {args.inserts:,} more {per_row * 1000:.2f} ms/row"
            )
            for ef in args.ef_search:
                await conn.execute(f"SET hnsw.ef_search = {int(ef)}")
                times, recalls = [], []
                for q, want in zip(queries, truth, strict=True):
                    started = time.perf_counter()
                    got = await _top(conn, "t", q)
                    times.append(time.perf_counter() - started)
                    recalls.append(len(want & set(got)) / K)
                print(
                    f"[{kind}]   ef_search={ef}: recall@{K} {sum(recalls) / len(recalls):.3f}, "
                    f"p50 {percentile(times, 50) * 1000:.1f} ms, "
                    f"p99 {percentile(times, 99) * 1000:.1f} ms",
                    flush=True,
                )
        await conn.execute("DROP TABLE IF EXISTS base, t")


async def main() -> None:
    """Run the measurements and print them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--inserts", type=int, default=2_000)
    parser.add_argument("--data", nargs="+", choices=KINDS, default=["mixture", "isotropic"])
    parser.add_argument("--builds", nargs="+", default=["16:64", "16:128", "24:128"])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[40, 100, 200])
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    builds = [(int(b.split(":")[0]), int(b.split(":")[1])) for b in args.builds]
    url = server_url(args.database_url)
    require_local(url)
    async with bench_database(url, "pgbatch_bench_vtune") as conninfo:
        async with await connect(conninfo) as conn:
            await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for kind in args.data:
            await run_kind(conninfo, kind, args, builds)


if __name__ == "__main__":
    asyncio.run(main())
