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
- **search**: k = 10 nearest by cosine through HNSW (pgvector defaults m = 16,
  ef_construction = 64; ef_search = 100) vs exact: p50 / p99 latency and recall@10
  against exact; then again with a metadata filter that keeps 1 % of the documents
  (iterative index scans, relaxed order).

The vectors are clustered (100 random centres plus noise), not uniform: uniform random
vectors in 384 dimensions are the worst case for any graph index.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pgbatch
from benchmarks.harness import bench_database, connect, percentile, require_local, server_url
from pgbatch.workloads import vectors

DIM = 384
CHUNKS_PER_DOC = 10
DOCS_PER_GROUP = 1_000
K = 10
CENTRES = 100
FILTER_BUCKETS = 100  # a filter on one bucket keeps 1 % of the documents


def _unit(values: list[float]) -> list[float]:
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def make_vectors(count: int, rng: random.Random, noise: float, latent: int) -> list[list[float]]:
    """Return `count` unit vectors around CENTRES random centres.

    With `latent` > 0 the spread around a centre lives in a random `latent`-dimensional
    subspace (real embeddings have a low intrinsic dimension); with 0 it is isotropic
    Gaussian noise in all DIM dimensions (the hardest case for a graph index).
    """
    centres = [_unit([rng.gauss(0, 1) for _ in range(DIM)]) for _ in range(CENTRES)]
    basis = [[rng.gauss(0, 1) / math.sqrt(DIM) for _ in range(DIM)] for _ in range(latent)]
    out = []
    for _ in range(count):
        centre = centres[rng.randrange(CENTRES)]
        if latent:
            weights = [rng.gauss(0, noise * math.sqrt(DIM / latent)) for _ in range(latent)]
            spread = [
                sum(w * b[i] for w, b in zip(weights, basis, strict=True)) for i in range(DIM)
            ]
            out.append(_unit([c + s for c, s in zip(centre, spread, strict=True)]))
        else:
            out.append(_unit([c + rng.gauss(0, noise) for c in centre]))
    return out


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
        await conn.execute("CREATE INDEX ON raw_chunks USING hnsw (embedding vector_cosine_ops)")
        started = time.perf_counter()
        async with conn.cursor() as cur:
            async with cur.copy("COPY raw_chunks FROM STDIN") as copy:
                for n, vector in enumerate(table):
                    await copy.write_row(
                        (n // CHUNKS_PER_DOC, n % CHUNKS_PER_DOC, 1, f"c{n}", _text(vector))
                    )
        return time.perf_counter() - started


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
    parser.add_argument("--ef-search", type=int, nargs="+", default=[200])
    # 0.05 per value makes tight clusters of near-duplicates (norm of the noise ~1, so
    # ~0.7 of a centre's direction); larger is more spread out.
    parser.add_argument("--noise", type=float, default=0.05)
    parser.add_argument("--latent", type=int, default=0, help="intrinsic dimension (0: all)")
    parser.add_argument("--database-url")
    args = parser.parse_args()
    url = server_url(args.database_url)
    require_local(url)
    rng = random.Random(11)
    print(f"making {args.chunks:,} vectors of {DIM} ...", flush=True)
    table = make_vectors(args.chunks, rng, args.noise, args.latent)
    queries = make_vectors(args.queries, rng, args.noise, args.latent)
    async with bench_database(url, "pgbatch_bench_vectors") as conninfo:
        app = pgbatch.App(settings=pgbatch.Settings(database_url=conninfo))
        app.use(vectors.WORKLOAD)
        vectors.embedders(app).register("lookup", lambda: LookupEmbedder(table))
        async with app:
            library = await vectors.create_library(
                app, tenant="bench", name="bench", embedder="lookup"
            )
            ours = await index_end_to_end(app, library.id, args.chunks)
            baseline = await raw_copy(conninfo, table)
            print(
                f"indexing {args.chunks:,} chunks: pgbatch {ours:.1f} s "
                f"({args.chunks / ours:,.0f} chunks/s, "
                f"{args.chunks / CHUNKS_PER_DOC / ours:,.0f} docs/s); raw COPY {baseline:.1f} s "
                f"({args.chunks / baseline:,.0f} chunks/s); ratio {baseline / ours:.2f}"
            )
            for label, where in (("unfiltered", None), ("filter 1%", {"bucket": 0})):
                for ef in args.ef_search:
                    p50, p99, exact50, recall = await measure_search(
                        app, library.id, queries, where, ef
                    )
                    print(
                        f"search k={K} {label} ef_search={ef}: HNSW p50 {p50 * 1000:.1f} ms, "
                        f"p99 {p99 * 1000:.1f} ms; exact p50 {exact50 * 1000:.1f} ms; "
                        f"recall@{K} {recall:.3f}"
                    )


if __name__ == "__main__":
    asyncio.run(main())
