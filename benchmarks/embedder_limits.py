"""What the shared rate limit costs the OpenAI embedder: embed() with it vs without.

One process, one fake upstream on loopback (no limit of its own, `--latency-ms` per
request), one fresh database. Rounds interleave the two modes on the same texts: (1) the
embedder charging the LLM workload's shared limit of upstream "default" (an rpm and tpm
far above what the run uses, so it never refuses: the figure is the bookkeeping, one
reserve and one settle statement per round of requests); (2) the embedder alone (no
upstream named: nothing shared). Medians of each mode's wall time per embed() call.

    .venv/bin/python -m benchmarks.embedder_limits --rounds 15 --texts 512 --batch-inputs 32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.harness import bench_database, require_local, server_url, write_results
from pgbatch.app import App
from pgbatch.config import Settings
from pgbatch.workloads import llm
from pgbatch.workloads.llm.config import Limit, LlmConfig, Upstream
from pgbatch.workloads.llm.fake_upstream import (
    EMBEDDING_DIMENSIONS,
    FakeLimits,
    FakeUpstream,
    serving,
)
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.upstream import UpstreamConfig
from pgbatch.workloads.vectors import OpenAIEmbedder

# Far above what a run sends (rounds x requests per round): the limit never refuses.
UNBINDING_RPM = 1_000_000
UNBINDING_TPM = 1_000_000_000


async def run(args: argparse.Namespace) -> dict[str, object]:
    """Interleave rounds of both modes; return the medians and their ratio."""
    url = server_url(args.database_url)
    require_local(url)
    texts = [f"chunk {n} of a document about shared limits" for n in range(args.texts)]
    timings: dict[str, list[float]] = {"shared": [], "alone": []}
    fake = FakeUpstream(FakeLimits(latency_ms=args.latency_ms))
    async with bench_database(url, "pgbatch_bench_embedder") as db, serving(fake) as base:
        app = App(settings=Settings(database_url=db))
        app.use(llm.WORKLOAD)
        limit = Limit("default", rpm=UNBINDING_RPM, tpm=UNBINDING_TPM)
        upstream = Upstream("default", UpstreamConfig(base_url=base), limit=limit)
        runner_of(app).configure(LlmConfig({"default": upstream}))
        await app.open()

        def embedder(**sharing: object) -> OpenAIEmbedder:
            return OpenAIEmbedder(
                base_url=base, model="e", dimension=EMBEDDING_DIMENSIONS,
                batch_inputs=args.batch_inputs, max_concurrency=args.concurrency,
                **sharing,  # type: ignore[arg-type]
            )  # fmt: skip

        embedders = {"shared": embedder(app=app, upstream="default"), "alone": embedder()}
        try:
            for warm in embedders.values():  # connections, the limit's row
                await warm.embed(texts[:1])
            for n in range(args.rounds):
                order = ["shared", "alone"] if n % 2 == 0 else ["alone", "shared"]
                for mode in order:
                    started = time.perf_counter()
                    vectors = await embedders[mode].embed(texts)
                    timings[mode].append(time.perf_counter() - started)
                    assert len(vectors) == len(texts)
        finally:
            for made in embedders.values():
                await made.aclose()
            await app.close()
    shared, alone = statistics.median(timings["shared"]), statistics.median(timings["alone"])
    requests = -(-args.texts // args.batch_inputs)
    result: dict[str, object] = {
        "rounds": args.rounds, "texts": args.texts, "batch_inputs": args.batch_inputs,
        "requests_per_embed": requests, "concurrency": args.concurrency,
        "latency_ms": args.latency_ms, "median_shared_s": shared, "median_alone_s": alone,
        "ratio_shared_over_alone": shared / alone, "load": os.getloadavg(),
    }  # fmt: skip
    print(
        f"embed() of {args.texts} texts ({requests} requests, {args.concurrency} at once, "
        f"{args.latency_ms:g} ms each): median {shared * 1000:.1f} ms with the shared limit, "
        f"{alone * 1000:.1f} ms alone; ratio {shared / alone:.3f} over {args.rounds} rounds "
        f"each (load {os.getloadavg()[0]:.1f})"
    )
    return result


def main() -> None:
    """Parse the options, run, write benchmarks/results/embedder_limits.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database-url")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-inputs", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    result = asyncio.run(run(parser.parse_args()))
    print(write_results("embedder_limits", result))


if __name__ == "__main__":
    main()
