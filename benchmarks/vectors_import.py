"""Bulk import of NDJSON documents into a vector library vs the core's NDJSON batch submit.

Issue 11: "Bulk import of 100,000 documents from NDJSON streams like batches do". Both
sides read the same NDJSON file line by line in a process of their own (so each one's
peak RSS is its own): `import` runs `vectors.import_documents` (the documents, one
indexing batch and its items, one transaction); `submit` is the same-run baseline,
`app.submit` of the same lines parsed as items of a no-op task (the path POST
/v1/batches with NDJSON takes after spooling). Rounds alternate, medians are printed.
Indexing is not measured here (no worker runs; benchmarks/vectors.py measures it). The
batches are left queued (cancelling 100,000 items writes 100,000 results): run it on a
database no worker of the workload uses, as the embedded one of a checkout.

    .venv/bin/python benchmarks/vectors_import.py --documents 100000 --rounds 3

Uses the embedded server (pgvector) unless DATABASE_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import orjson

import pgbatch
from pgbatch.config import Settings
from pgbatch.db.database import resolve_url
from pgbatch.workloads import vectors

NOOP_TASK = "bench.import_noop"


def write_file(path: Path, documents: int) -> int:
    """Write `documents` NDJSON lines (about 300 characters of text, metadata); return bytes."""
    words = "vacuum freezes tuples while hnsw graphs index vectors of every library".split()
    with path.open("wb") as out:
        for n in range(documents):
            text = " ".join(words[(n + k) % len(words)] for k in range(40))
            out.write(orjson.dumps({"text": f"{n} {text}", "metadata": {"n": n % 100}}) + b"\n")
    return path.stat().st_size


def _lines(path: Path) -> Iterator[bytes]:
    with path.open("rb") as lines:
        yield from lines


async def child(mode: str, path: Path, url: str) -> dict[str, float]:
    """Run one side once; return its figures."""
    app = pgbatch.App(database_url=url)
    app.use(vectors.WORKLOAD)

    @app.task(NOOP_TASK)
    async def noop(items: list[pgbatch.Item], _: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok(None) for _ in items]

    async with app:
        if mode == "import":
            library = await vectors.create_library(
                app, tenant="bench", name=f"import-{os.getpid()}-{time.time_ns()}"
            )
            started = time.perf_counter()
            count, batch = await vectors.import_documents(
                app, library.id, _lines(path), tenant="bench"
            )
            elapsed = time.perf_counter() - started
        elif mode == "submit":
            started = time.perf_counter()
            batch = await app.submit(
                NOOP_TASK, (orjson.loads(line) for line in _lines(path)), tenant="bench"
            )
            elapsed = time.perf_counter() - started
            count = batch.total_items
        else:  # "idle": what the process costs before either side does anything
            return {"seconds": 0.0, "documents": 0}
        assert batch is not None
    return {"seconds": elapsed, "documents": count}


def run_child(mode: str, path: Path, url: str) -> tuple[dict[str, float], float]:
    """Run one side in a child process; return its figures and its peak RSS in MiB."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", mode, "--file", str(path), "--url", url],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} child failed ({proc.returncode})")
    return orjson.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 1024


def main() -> None:
    """Interleave rounds of both sides and print their medians."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--documents", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["import", "submit", "idle"])
    parser.add_argument("--file", type=Path)
    parser.add_argument("--url")
    args = parser.parse_args()
    if args.child:
        figures = asyncio.run(child(args.child, args.file, args.url))
        sys.stdout.write(orjson.dumps(figures).decode() + "\n")
        return
    url = os.environ.get("DATABASE_URL") or resolve_url(Settings())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "documents.ndjson"
        size = write_file(path, args.documents)
        print(f"{args.documents} documents, {size / 2**20:.1f} MiB of NDJSON")
        print(f"load: {os.getloadavg()[0]:.2f} (1-minute average, {os.cpu_count()} cores)")
        _, idle_rss = run_child("idle", path, url)
        seconds: dict[str, list[float]] = {"submit": [], "import": []}
        rss: dict[str, list[float]] = {"submit": [], "import": []}
        for round_no in range(args.rounds):
            for mode in ("submit", "import") if round_no % 2 == 0 else ("import", "submit"):
                figures, peak = run_child(mode, path, url)
                assert figures["documents"] == args.documents, figures
                seconds[mode].append(figures["seconds"])
                rss[mode].append(peak)
                print(
                    f"round {round_no + 1} {mode:6}: {figures['seconds']:.2f} s, "
                    f"peak RSS {peak:.0f} MiB"
                )
    print(f"idle process (open app, no work): peak RSS {idle_rss:.0f} MiB")
    for mode in ("submit", "import"):
        median = statistics.median(seconds[mode])
        print(
            f"{mode:6} median {median:.2f} s ({args.documents / median:,.0f} docs/s), "
            f"peak RSS median {statistics.median(rss[mode]):.0f} MiB"
        )
    ratio = statistics.median(seconds["import"]) / statistics.median(seconds["submit"])
    print(f"import / submit time: {ratio:.2f}")


if __name__ == "__main__":
    main()
