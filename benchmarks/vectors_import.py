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

`--http` adds both sides over HTTP, in a process that runs the API and posts the file
to it (streamed, 1 MiB pieces): `POST /v1/libraries/{id}/documents/import` against
`POST /v1/batches` with the same NDJSON body; that process's peak RSS is the server's
plus a small client's.

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
from collections.abc import AsyncIterator, Iterator
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

    if mode.startswith("http-"):
        return await http_child(app, mode, path)
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


async def _body(path: Path) -> AsyncIterator[bytes]:
    with path.open("rb") as source:
        while piece := source.read(1 << 20):
            yield piece


async def http_child(app: pgbatch.App, mode: str, path: Path) -> dict[str, float]:
    """Serve the API in this process and post the file to it once; return the figures."""
    import httpx

    from pgbatch.api.server import server as api_server

    await app.open()
    http = api_server(app, host="127.0.0.1", port=0, log_level="warning")
    serving = asyncio.create_task(http.serve())
    while not http.started:
        if serving.done():
            serving.result()
        await asyncio.sleep(0.01)
    port = http.servers[0].sockets[0].getsockname()[1]
    headers = {"Content-Type": "application/x-ndjson"}
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            if mode == "http-import":
                library = await vectors.create_library(
                    app, tenant="default", name=f"http-{os.getpid()}-{time.time_ns()}"
                )
                url = f"/v1/libraries/{library.id}/documents/import"
            else:
                url = f"/v1/batches?task={NOOP_TASK}"
            started = time.perf_counter()
            answer = await client.post(url, content=_body(path), headers=headers)
            elapsed = time.perf_counter() - started
        if answer.status_code != 201:
            raise SystemExit(f"{mode}: {answer.status_code} {answer.text[:300]}")
        body = answer.json()
        count = body["documents"] if mode == "http-import" else body["total_items"]
    finally:
        http.should_exit = True
        await serving
        await app.close()
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
    parser.add_argument("--http", action="store_true", help="Also measure both over HTTP.")
    parser.add_argument(
        "--child", choices=["import", "submit", "idle", "http-import", "http-submit"]
    )
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
        modes = ["submit", "import"] + (["http-submit", "http-import"] if args.http else [])
        seconds: dict[str, list[float]] = {mode: [] for mode in modes}
        rss: dict[str, list[float]] = {mode: [] for mode in modes}
        for round_no in range(args.rounds):
            for mode in modes if round_no % 2 == 0 else modes[::-1]:
                figures, peak = run_child(mode, path, url)
                assert figures["documents"] == args.documents, figures
                seconds[mode].append(figures["seconds"])
                rss[mode].append(peak)
                print(
                    f"round {round_no + 1} {mode:11}: {figures['seconds']:.2f} s, "
                    f"peak RSS {peak:.0f} MiB"
                )
    print(f"idle process (open app, no work): peak RSS {idle_rss:.0f} MiB")
    for mode in modes:
        median = statistics.median(seconds[mode])
        print(
            f"{mode:11} median {median:.2f} s ({args.documents / median:,.0f} docs/s), "
            f"peak RSS median {statistics.median(rss[mode]):.0f} MiB"
        )
    ratio = statistics.median(seconds["import"]) / statistics.median(seconds["submit"])
    print(f"import / submit time: {ratio:.2f}")
    if args.http:
        ratio = statistics.median(seconds["http-import"]) / statistics.median(
            seconds["http-submit"]
        )
        print(f"over HTTP, import / submit time: {ratio:.2f}")


if __name__ == "__main__":
    main()
