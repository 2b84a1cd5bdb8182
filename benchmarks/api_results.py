"""Reading a million results over HTTP: rows/s and the server's memory, same run as COPY.

Run from the repository root:

    .venv/bin/python benchmarks/api_results.py [--results 1000000] [--database-url URL]

It writes a finished batch of N results straight into a fresh database (the results of
an echo task: a small JSON object per item, one error in a thousand), starts
`pgbatch serve` in its own process, and streams `GET /v1/batches/{id}/results` as NDJSON
and as CSV, and `?status=error`, counting rows and sampling the server's resident memory
every 50 ms. The baseline is `COPY (SELECT … FROM pgbatch.results …) TO STDOUT` on the
same database in the same run: what the database itself needs to hand the rows out.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx
import psutil  # type: ignore[import-untyped]

from benchmarks.harness import (
    RESULTS_DIR,
    bench_database,
    child_env,
    connect,
    fmt_int,
    python,
    require_local,
    server_url,
    spawn,
    stop_processes,
    write_results,
)
from pgbatch.db.migrations import migrate

PORT = 8391
SAMPLE_S = 0.05


async def _seed(conninfo: str, count: int) -> int:
    async with await connect(conninfo) as conn:
        await migrate(conn)
        row = await (
            await conn.execute(
                "INSERT INTO pgbatch.batches (task, shard_size, max_attempts, lease_ttl_s,"
                " total_items, total_shards, shards_done, items_ok, items_failed, status,"
                " started_at, finished_at)"
                " VALUES ('echo', 1000, 1, 30, %(n)s, 1, 1, %(n)s - %(n)s / 1000, %(n)s / 1000,"
                " 'succeeded', now(), now()) RETURNING id",
                {"n": count},
            )
        ).fetchone()
        assert row is not None
        batch_id = int(row[0])
        # As pgbatch stores them (0009): a result block per shard of 1000, a row per failure.
        await conn.execute(
            "INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)"
            " SELECT %(b)s, g / 1000 * 1000,"
            " json_agg(CASE WHEN g %% 1000 <> 7"
            "  THEN json_build_object('n', g, 'text', 'item, \"quoted\"') END ORDER BY g)"
            " FROM generate_series(0, %(n)s - 1) AS g GROUP BY g / 1000",
            {"b": batch_id, "n": count},
        )
        await conn.execute(
            "INSERT INTO pgbatch.result_errors (batch_id, seq, error)"
            " SELECT %(b)s, g, 'model error' FROM generate_series(0, %(n)s - 1) AS g"
            " WHERE g %% 1000 = 7",
            {"b": batch_id, "n": count},
        )
        await conn.execute("VACUUM ANALYZE pgbatch.result_blocks, pgbatch.result_errors")
    return batch_id


async def _copy_baseline(conninfo: str, batch_id: int) -> tuple[int, float]:
    async with await connect(conninfo) as conn:
        started = time.perf_counter()
        size = 0
        async with conn.cursor().copy(
            "COPY (SELECT seq, ok, output, error FROM pgbatch.results WHERE batch_id = "
            f"{batch_id} ORDER BY seq) TO STDOUT"
        ) as copy:
            async for data in copy:
                size += len(data)
        return size, time.perf_counter() - started


async def _stream(base_url: str, path: str, headers: dict[str, str], pid: int) -> dict[str, Any]:
    process = psutil.Process(pid)
    baseline_rss = process.memory_info().rss
    peak = baseline_rss
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(SAMPLE_S)

    sampler = asyncio.create_task(sample())
    lines = 0
    size = 0
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async with client.stream("GET", path, headers=headers) as response:
            response.raise_for_status()
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                lines += chunk.count(b"\n")
    elapsed = time.perf_counter() - started
    done.set()
    await sampler
    return {
        "path": path,
        "accept": headers.get("Accept", "application/x-ndjson"),
        "lines": lines,
        "bytes": size,
        "seconds": elapsed,
        "rows_per_s": lines / elapsed,
        "rss_before_mb": baseline_rss / 2**20,
        "rss_peak_mb": peak / 2**20,
    }


async def run(url: str, count: int) -> dict[str, Any]:
    """Seed, serve, stream three ways, compare with COPY; return the figures."""
    async with bench_database(url, "pgbatch_bench_results") as conninfo:
        batch_id = await _seed(conninfo, count)
        copy_bytes, copy_s = await _copy_baseline(conninfo, batch_id)
        log = RESULTS_DIR / "api_results_server.log"
        server = await spawn(
            [python(), "-m", "pgbatch", "serve", "--port", str(PORT)],
            env=child_env(conninfo),
            log=log,
        )
        base_url = f"http://127.0.0.1:{PORT}"
        try:
            async with httpx.AsyncClient(base_url=base_url) as client:
                for _ in range(200):
                    try:
                        if (await client.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise SystemExit(f"the server did not start; see {log}")
            path = f"/v1/batches/{batch_id}/results"
            runs = [
                await _stream(base_url, path, {}, server.pid),
                await _stream(base_url, path, {"Accept": "text/csv"}, server.pid),
                await _stream(base_url, path + "?status=error", {}, server.pid),
            ]
        finally:
            await stop_processes([server])
    return {
        "results": count,
        "copy_seconds": copy_s,
        "copy_bytes": copy_bytes,
        "copy_rows_per_s": count / copy_s,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=1_000_000)
    parser.add_argument("--database-url")
    args = parser.parse_args(argv)
    url = server_url(args.database_url)
    require_local(url)
    figures = asyncio.run(run(url, args.results))
    print(f"{fmt_int(figures['results'])} results of one batch, same database, same run")
    print(
        f"  COPY … TO STDOUT (baseline): {figures['copy_seconds']:.2f} s, "
        f"{fmt_int(figures['copy_rows_per_s'])} rows/s"
    )
    for r in figures["runs"]:
        ratio = r["rows_per_s"] / figures["copy_rows_per_s"]
        print(
            f"  GET {r['path'].split('/')[-1]:<22} {r['accept']:<20} {fmt_int(r['lines']):>10} "
            f"lines in {r['seconds']:.2f} s = {fmt_int(r['rows_per_s'])} rows/s "
            f"({ratio:.2f}x COPY); server RSS {r['rss_before_mb']:.0f} -> peak "
            f"{r['rss_peak_mb']:.0f} MB"
        )
    print(f"figures written to {write_results('api_results', figures)}")


if __name__ == "__main__":
    main()
