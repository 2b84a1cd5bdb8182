"""Vector libraries: indexing throughput vs a raw COPY, and HNSW latency and recall.

Run from the repository root (the embedded server has pgvector; DATABASE_URL must point
at a server with it):

    .venv/bin/python benchmarks/vectors.py [--chunks 100000] [--queries 200]

Same run, same database:
- **indexing**: `--chunks` chunks of dimension 384 (documents of 10 pre-cut chunks, the
  vectors precomputed: an embedder that looks them up, so embedding is excluded) added
  in groups of 1,000 documents and indexed by a worker of this process, end to end
  (insert, batch, handler, fenced commit with the chunk replacement and the HNSW
  insertions) vs a raw COPY of the same vectors into a table of the same shape with the
  same HNSW index: the ratio is what the engine costs over the bare write.
- **search**: k = 10 nearest by cosine through HNSW (the library's index: m 16,
  ef_construction 128; `--ef-search`, default the library's 200) vs exact: p50 / p99
  latency and recall@10 against exact; then again with a metadata filter that keeps 1 %
  of the documents (iterative index scans, relaxed order, exact fallback).

The data (`--data`, benchmarks/vector_data.py): `mixture` by default (topics of uneven
size, each spread in a low-dimensional subspace of its own, like real embeddings);
`isotropic` (each topic a Gaussian in all 384 dimensions: the stress case) and
`offtopic` (queries around other centres than the data's: this benchmark's data before
issue 11's recall work, a pathology) on request. Queries come from the data's topics.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgbatch
from benchmarks.harness import bench_database, connect, percentile, require_local, server_url
from benchmarks.vector_data import KINDS, Topics
from pgbatch.workloads import vectors
from pgbatch.workloads.vectors.libraries import DEFAULT_EF_SEARCH
from pgbatch.workloads.vectors.queries import HNSW_EF_CONSTRUCTION, HNSW_M

DIM = 384
CHUNKS_PER_DOC = 10
DOCS_PER_GROUP = 1_000
K = 10
TOPICS = 100
FILTER_BUCKETS = 100  # a filter on one bucket keeps 1 % of the documents


class LookupEmbedder:
    """Precomputed vectors: chunk text "c<i>" is vector i (embedding excluded)."""

    dimension = DIM

    def __init__(self, table: Sequence[list[float]]) -> None:
        self.table = table

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Return the stored vector of each chunk."""
        return [self.table[int(t[1:])] for t in texts]


def _text(vector: Sequence[float]) -> str:
    return "[" + ",".join(f"{x:.6f}" for x in vector) + "]"


async def index_end_to_end(app: pgbatch.App, library_id: int, chunks: int) -> float:
    """Add and index every document; return the seconds it took."""
    docs = [
        vectors.DocumentIn(
            chunks=[f"c{d * CHUNKS_PER_DOC + i}" for i in range(CHUNKS_PER_DOC)],
            metadata={"bucket": d % FILTER_BUCKETS},
        )
        for d in range(chunks // CHUNKS_PER_DOC)
    ]
    worker = app.worker(concurrency=4)
    running = asyncio.create_task(worker.run())
    started = time.perf_counter()
    batch_ids = []
    for start in range(0, len(docs), DOCS_PER_GROUP):
        _, batch = await vectors.add_documents(
            app, library_id, docs[start : start + DOCS_PER_GROUP], tenant="bench"
        )
        assert batch is not None
        batch_ids.append(batch.id)
    for batch_id in batch_ids:
        done = await app.wait(batch_id)
        assert done.status == "succeeded", done
    elapsed = time.perf_counter() - started
    worker.request_stop()
    await running
    return elapsed


async def raw_copy(url: str, table: Sequence[list[float]]) -> float:
    """COPY the same vectors into a table of the same shape and index; return seconds."""
    async with await connect(url) as conn:
        await conn.execute(
            f"CREATE TABLE raw_chunks (document_id bigint, seq integer, content_version bigint,"
            f" text text, embedding vector({DIM}), PRIMARY KEY (document_id, seq))"
        )
        await conn.execute(
            "CREATE INDEX ON raw_chunks USING hnsw (embedding vector_cosine_ops)"
            f" WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )
        started = time.perf_counter()
        async with conn.cursor() as cur:
            async with cur.copy("COPY raw_chunks FROM STDIN") as copy:
                for n, vector in enumerate(table):
                    await copy.write_row(
                        (n // CHUNKS_PER_DOC, n % CHUNKS_PER_DOC, 1, f"c{n}", _text(vector))
                    )
        return time.perf_counter() - started


async def bulk_load(app: pgbatch.App, library_id: int, table: Sequence[list[float]]) -> float:
    """Fill the library without the engine: documents, then its chunk table by COPY with
    the index dropped and made again by CREATE INDEX (same m / ef_construction, pgvector's
    parallel bulk build); return the seconds of the CREATE INDEX. For search figures at
    a size whose end-to-end indexing would outlast a loaded machine's patience."""
    docs = [
        vectors.DocumentIn(chunks=["x"], metadata={"bucket": d % FILTER_BUCKETS})
        for d in range(len(table) // CHUNKS_PER_DOC)
    ]
    ids: list[int] = []
    for start in range(0, len(docs), DOCS_PER_GROUP):
        added, _ = await vectors.add_documents(
            app, library_id, docs[start : start + DOCS_PER_GROUP], tenant="bench"
        )
        ids.extend(d.id for d in added)
    chunks = f"pgbatch.vector_chunks_{library_id}"
    async with app.db.connection() as conn:
        await conn.execute(f"DROP INDEX pgbatch.vector_chunks_{library_id}_hnsw")
        async with conn.cursor() as cur:
            async with cur.copy(
                f"COPY {chunks} (document_id, seq, content_version, text, embedding) FROM STDIN"
            ) as copy:
                for n, vector in enumerate(table):
                    doc = ids[n // CHUNKS_PER_DOC]
                    await copy.write_row((doc, n % CHUNKS_PER_DOC, 1, f"c{n}", _text(vector)))
        await conn.execute(
            "UPDATE pgbatch.vector_documents SET status = 'indexed', indexed_version = 1"
            " WHERE library_id = %s",
            (library_id,),
        )
        await conn.commit()
        await conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        await conn.execute(
            f"CREATE INDEX vector_chunks_{library_id}_hnsw ON {chunks}"
            " USING hnsw (embedding vector_cosine_ops)"
            f" WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
        )
        built = time.perf_counter() - started
        await conn.execute(f"ANALYZE {chunks}")
        await conn.execute("ANALYZE pgbatch.vector_documents")
        await conn.commit()
    return built


async def measure_search(
    app: pgbatch.App,
    library_id: int,
    queries: list[list[float]],
    metadata_filter: dict | None,
    ef_search: int,
) -> tuple[float, float, float, float]:
    """Return HNSW p50, p99 (s), exact p50 (s) and mean recall@10 against exact."""
    hnsw_times, exact_times, recalls = [], [], []
    for query in queries:
        started = time.perf_counter()
        approx = await vectors.search(
            app, library_id, tenant="bench", vector=query, k=K,
            metadata_filter=metadata_filter, ef_search=ef_search,
        )  # fmt: skip
        hnsw_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        exact = await vectors.search(
            app, library_id, tenant="bench", vector=query, k=K,
            metadata_filter=metadata_filter, exact=True,
        )  # fmt: skip
        exact_times.append(time.perf_counter() - started)
        truth = {(h.document_id, h.seq) for h in exact}
        recalls.append(len(truth & {(h.document_id, h.seq) for h in approx}) / max(1, len(truth)))
    return (
        percentile(hnsw_times, 50),
        percentile(hnsw_times, 99),
        percentile(exact_times, 50),
        sum(recalls) / len(recalls),
    )


async def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=20_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--ef-search", type=int, nargs="+", default=[DEFAULT_EF_SEARCH])
    # The topics' spread: 0.05 per value is a spread of norm ~1 (the centre's) in all
    # 384 dimensions for `isotropic`, the same norm in 8-32 dimensions for `mixture`.
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument(
        "--data", choices=KINDS, default="mixture", help="benchmarks/vector_data.py"
    )
    parser.add_argument(
        "--load",
        choices=("batch", "bulk"),
        default="batch",
        help="batch: index end to end vs a raw COPY; bulk: COPY + CREATE INDEX, search only",
    )
    parser.add_argument("--database-url")
    args = parser.parse_args()
    url = server_url(args.database_url)
    require_local(url)
    topics = Topics(args.data, random.Random(11), dim=DIM, topics=TOPICS, noise=args.noise)
    print(f"making {args.chunks:,} vectors of {DIM} ({args.data}) ...", flush=True)
    table = topics.draw(args.chunks)
    # Queries come from the data's topics (`offtopic`: from other ones, on purpose).
    queries = topics.draw(args.queries, queries=True)
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    async with bench_database(url, "pgbatch_bench_vectors") as conninfo:
        app = pgbatch.App(settings=pgbatch.Settings(database_url=conninfo))
        app.use(vectors.WORKLOAD)
        vectors.embedders(app).register("lookup", lambda: LookupEmbedder(table))
        async with app:
            library = await vectors.create_library(
                app, tenant="bench", name="bench", embedder="lookup"
            )
            if args.load == "bulk":
                built = await bulk_load(app, library.id, table)
                print(f"bulk load: CREATE INDEX on {args.chunks:,} chunks {built:.1f} s")
            else:
                ours = await index_end_to_end(app, library.id, args.chunks)
                baseline = await raw_copy(conninfo, table)
                print(
                    f"indexing {args.chunks:,} chunks: pgbatch {ours:.1f} s "
                    f"({args.chunks / ours:,.0f} chunks/s, "
                    f"{args.chunks / CHUNKS_PER_DOC / ours:,.0f} docs/s); raw COPY "
                    f"{baseline:.1f} s ({args.chunks / baseline:,.0f} chunks/s); "
                    f"ratio {baseline / ours:.2f}",
                    flush=True,
                )
            for label, where in (("unfiltered", None), ("filter 1%", {"bucket": 0})):
                for ef in args.ef_search:
                    p50, p99, exact50, recall = await measure_search(
                        app, library.id, queries, where, ef
                    )
                    print(
                        f"search k={K} {label} ef_search={ef}: HNSW p50 {p50 * 1000:.1f} ms, "
                        f"p99 {p99 * 1000:.1f} ms; exact p50 {exact50 * 1000:.1f} ms; "
                        f"recall@{K} {recall:.3f}",
                        flush=True,
                    )
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    asyncio.run(main())
