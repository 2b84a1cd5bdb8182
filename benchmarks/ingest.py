"""Document ingest: the group-commit writer against one transaction per document, same run.

Run from the repository root:

    .venv/bin/python benchmarks/ingest.py [--seconds 10] [--clients 64] [--rounds 1]
        [--database-url URL | --private-server] [--sweep SECONDS]

64 asyncio clients in this one process post single documents with references (the
workload of examples/documents.py), each waiting for its outcome before the next post.
Each mode runs for a bounded time on the same database, tables emptied in between:

- writer: DocumentWriter at its default settings (lanes, max_batch, max_delay_ms);
- baselines, one transaction per document through the writer's own flush code, each
  with a small pool (its best on a small machine) and with one connection per client:
  "statements" (BEGIN, existence query, upsert, references, COMMIT: how a request
  handler writes one document) and "one statement" (the writer's single statement,
  in an implicit transaction).

It prints docs/s, p50/p99 latency, the ratio of the writer to each baseline, the
flush-size distribution and a PASS/MISS per target, checks that every acknowledged
document is stored, writes benchmarks/results/ingest.json and drops its database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil

from benchmarks.harness import (
    bench_database,
    fmt_int,
    fmt_ms,
    percentile,
    require_local,
    server_info,
    server_url,
    verdict,
    write_results,
)
from examples.documents import IngestResult, baseline_poster, run_ingest
from pgbatch.db.database import Database
from pgbatch.db.embedded import embedded_url, stop_embedded
from pgbatch.workloads.documents import (
    DocumentSink,
    DocumentWriter,
    create_document_tables,
    document_item,
)
from pgbatch.writer.flush import FlushCounters, FlushPath, write_flush
from pgbatch.writer.writer import DEFAULT_LANES, DEFAULT_MAX_BATCH, DEFAULT_MAX_DELAY_MS

CLIENTS = 64
SECONDS_PER_MODE = 10.0
# The writer needs a connection per lane, plus one for whoever else uses the pool.
WRITER_POOL = DEFAULT_LANES + 1
# One transaction per document with 8 connections, then with one per client: on a small
# machine the small pool is the faster baseline.
BASELINE_POOLS = (8, CLIENTS)
# The baselines, by the name their mode is printed with.
BASELINE_PATHS = {
    "tx/doc, statements": FlushPath.STATEMENT_BY_STATEMENT,
    "tx/doc, one statement": FlushPath.ONE_STATEMENT,
}
# The baseline the target is judged against: the transaction a request handler
# writes for one document (docs/writer.md says why, and prints the other ratio beside it).
TARGET_BASELINE = "tx/doc, statements"
# Targets from the issue, at the library level.
TARGET_RATIO = 10.0
TARGET_WRITER_P99_S = 0.050
# One-row inserts, each committed alone, to measure the commit latency `c`.
COMMIT_SAMPLES = 300
# Flush sizes are reported in these buckets (upper bounds, inclusive).
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
# The cost of one flush by size, measured alone (no concurrency): t(B) = a + B·v.
FLUSH_COST_SIZES = (1, 16, 64, 256, 1024)
FLUSH_COST_DOCUMENTS = 4096  # per size: enough flushes for a stable median
# --sweep: (lanes, max_batch, max_delay_ms) points, each run for --sweep-seconds.
SWEEP = (
    (1, 256, 0.0), (2, 256, 0.0), (3, 256, 0.0), (4, 256, 0.0), (6, 256, 0.0),
    (3, 256, 2.0), (3, 256, 10.0), (3, 16, 0.0), (3, 64, 0.0),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class ModeFigures:
    """What one mode measured."""

    mode: str
    pool: int
    docs_per_s: float
    written: int
    rejected: int
    conflicts: int
    p50_s: float
    p99_s: float
    busy_cores: float
    # CPU seconds per written document of this process and of its PostgreSQL backends:
    # what the work costs, whatever else the machine runs at the same time
    client_cpu_per_doc_s: float
    server_cpu_per_doc_s: float
    missing_acknowledged: int

    @property
    def cpu_per_doc_s(self) -> float:
        """Return client + server CPU seconds per written document."""
        return self.client_cpu_per_doc_s + self.server_cpu_per_doc_s

    def line(self) -> str:
        """Return the figures as one printed line."""
        return (
            f"{self.mode:<32} {fmt_int(self.docs_per_s):>8} docs/s   p50 {fmt_ms(self.p50_s):>9}"
            f"   p99 {fmt_ms(self.p99_s):>9}   CPU/doc {self.cpu_per_doc_s * 1e6:5.0f} us"
            f" (client {self.client_cpu_per_doc_s * 1e6:.0f} + server"
            f" {self.server_cpu_per_doc_s * 1e6:.0f})   machine {self.busy_cores:.1f} cores busy"
            f"   written {self.written}, rejected {self.rejected}, conflicts {self.conflicts}"
        )


async def empty_tables(db: Database) -> None:
    """Replace the document tables with new, empty ones."""
    # New tables rather than TRUNCATE + VACUUM: statistics that say "empty" make every
    # connection cache sequential-scan plans (the foreign-key checks' among them) that
    # stay until autovacuum analyzes again, and the run would measure that.
    async with db.connection() as conn:
        await conn.execute("DROP TABLE IF EXISTS pgbatch.document_references, pgbatch.documents")
        # The workload's migration then makes them again.
        await conn.execute("DELETE FROM pgbatch.workload_migrations WHERE component = 'documents'")
    await create_document_tables(db)


async def measure_commit_latency(conninfo: str) -> tuple[float, float]:
    """Return p50 and p99 seconds of a one-row INSERT committed on its own (autocommit)."""
    async with Database(conninfo, max_size=1) as db, db.connection() as conn:
        await conn.execute("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, n int)")
        timings = []
        for n in range(COMMIT_SAMPLES):  # one commit per sample is what is measured
            started = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit (n) VALUES (%s)", (n,), prepare=True)
            timings.append(time.perf_counter() - started)
        await conn.execute("DROP TABLE bench_commit")
    return percentile(timings, 50), percentile(timings, 99)


def _cpu_seconds(pids: list[int]) -> float:
    """Return the CPU seconds (user + system) used so far by the processes `pids`."""
    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:  # a backend that ended: the window misses its last share
            continue
        total += times.user + times.system
    return total


def _machine_busy_seconds() -> float:
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


async def _backend_pids(db: Database) -> list[int]:
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        )
        return [row[0] for row in await cur.fetchall()]


async def missing_acknowledged(db: Database, acknowledged: set[uuid.UUID]) -> int:
    """Return how many of the `acknowledged` document keys are not in the database."""
    async with db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgbatch.documents WHERE key = ANY(%s)", (list(acknowledged),)
        )
        row = await cur.fetchone()
    return len(acknowledged) - int(row[0] if row else 0)


async def run_mode(
    conninfo: str,
    mode: str,
    *,
    pool: int,
    clients: int,
    seconds: float,
    settings: dict[str, Any] | None = None,
) -> tuple[ModeFigures, IngestResult]:
    """Run one mode for `seconds` on emptied tables and return its figures.

    `settings` are the writer's (lanes, max_batch, max_delay_ms); its defaults without.
    """
    acknowledged: set[uuid.UUID] = set()
    async with Database(conninfo, max_size=pool, min_size=pool) as db:
        await empty_tables(db)
        backends = await _backend_pids(db)
        started = time.perf_counter()
        machine_before = _machine_busy_seconds()
        client_before = _cpu_seconds([os.getpid()])
        server_before = _cpu_seconds(backends)
        if mode == "writer":
            async with DocumentWriter(db, **(settings or {})) as writer:
                result = await run_ingest(
                    writer.write,
                    mode=mode,
                    clients=clients,
                    duration_s=seconds,
                    on_ack=acknowledged.add,
                )
            result.stats = writer.stats
        else:
            result = await run_ingest(
                baseline_poster(db, BASELINE_PATHS[mode]),
                mode=mode,
                clients=clients,
                duration_s=seconds,
                on_ack=acknowledged.add,
            )
        client_s = _cpu_seconds([os.getpid()]) - client_before
        server_s = _cpu_seconds(backends) - server_before
        busy_cores = (_machine_busy_seconds() - machine_before) / (time.perf_counter() - started)
        missing = await missing_acknowledged(db, acknowledged)
    written = max(result.written, 1)
    figures = ModeFigures(
        mode=f"{mode} (pool {pool})",
        pool=pool,
        docs_per_s=result.docs_per_s,
        written=result.written,
        rejected=result.rejected,
        conflicts=result.conflicts,
        p50_s=percentile(result.latencies_s, 50),
        p99_s=percentile(result.latencies_s, 99),
        busy_cores=busy_cores,
        client_cpu_per_doc_s=client_s / written,
        server_cpu_per_doc_s=server_s / written,
        missing_acknowledged=missing,
    )
    return figures, result


async def measure_flush_cost(conninfo: str) -> dict[int, float]:
    """Return the median seconds of one flush of B documents (2 references each), by B."""
    costs: dict[int, float] = {}
    async with Database(conninfo, max_size=1) as db:
        await empty_tables(db)
        sink = DocumentSink()
        counters = FlushCounters()
        roots = [{"type": "root", "id": str(n)} for n in range(16)]
        await write_flush(db, sink, [document_item(r, {}) for r in roots], counters)
        for size in FLUSH_COST_SIZES:
            timings = []
            for flush_no in range(max(5, FLUSH_COST_DOCUMENTS // size)):
                items = [
                    document_item(
                        {"type": "leaf", "id": f"{size}-{flush_no}-{n}"},
                        {"n": n, "note": "x" * 64},
                        references=[roots[n % 16], roots[(n + 1) % 16]],
                    )
                    for n in range(size)
                ]
                started = time.perf_counter()
                await write_flush(db, sink, items, counters)  # one flush at a time: measured
                timings.append(time.perf_counter() - started)
            costs[size] = statistics.median(timings)
    return costs


def fit_line(costs: dict[int, float]) -> tuple[float, float]:
    """Return (a, v) of the least-squares line t(B) = a + B·v through the flush costs."""
    sizes = list(costs)
    mean_b = statistics.fmean(sizes)
    mean_t = statistics.fmean(costs.values())
    slope = sum((b - mean_b) * (costs[b] - mean_t) for b in sizes) / sum(
        (b - mean_b) ** 2 for b in sizes
    )
    return mean_t - slope * mean_b, slope


async def sweep(conninfo: str, *, clients: int, seconds: float) -> list[dict[str, Any]]:
    """Run the writer at each SWEEP point; return its figures per point."""
    rows = []
    for lanes, max_batch, max_delay_ms in SWEEP:
        settings = {"lanes": lanes, "max_batch": max_batch, "max_delay_ms": max_delay_ms}
        figures, result = await run_mode(
            conninfo, "writer", pool=lanes + 1, clients=clients, seconds=seconds, settings=settings
        )
        assert result.stats is not None
        print(
            f"lanes {lanes}  max_batch {max_batch:>4}  max_delay_ms {max_delay_ms:>4}:  "
            f"{fmt_int(figures.docs_per_s):>7} docs/s  p50 {fmt_ms(figures.p50_s):>9}  "
            f"p99 {fmt_ms(figures.p99_s):>9}  CPU/doc {figures.cpu_per_doc_s * 1e6:4.0f} us  "
            f"mean flush {result.stats.mean_flush_size:.1f}"
        )
        rows.append(
            {**settings, **asdict(figures), "mean_flush_size": result.stats.mean_flush_size}
        )
    return rows


def size_distribution(flush_sizes: dict[int, int]) -> list[dict[str, Any]]:
    """Bucket flush sizes: flushes and share of items per bucket."""
    items = sum(size * count for size, count in flush_sizes.items()) or 1
    rows = []
    low = 1
    for high in SIZE_BUCKETS:
        flushes = sum(c for s, c in flush_sizes.items() if low <= s <= high)
        in_items = sum(s * c for s, c in flush_sizes.items() if low <= s <= high)
        if flushes:
            label = f"{low}" if low == high else f"{low}-{high}"
            rows.append({"sizes": label, "flushes": flushes, "items_pct": 100 * in_items / items})
        low = high + 1
    return rows


async def run_round(
    conninfo: str, *, clients: int, seconds: float
) -> tuple[ModeFigures, IngestResult, list[ModeFigures]]:
    """Run the writer, then every baseline at every pool size; print and return the figures."""
    writer, writer_result = await run_mode(
        conninfo, "writer", pool=WRITER_POOL, clients=clients, seconds=seconds
    )
    print(writer.line())
    baselines = []
    for mode in BASELINE_PATHS:
        for pool in BASELINE_POOLS:
            figures, _ = await run_mode(conninfo, mode, pool=pool, clients=clients, seconds=seconds)
            print(figures.line())
            baselines.append(figures)
    return writer, writer_result, baselines


def _round_ratios(
    writer: ModeFigures, baselines: list[ModeFigures]
) -> tuple[dict[str, float], dict[str, float]]:
    """Return the writer's throughput and CPU ratios to each baseline's best pool in a round."""
    best: dict[str, ModeFigures] = {}
    for figures in baselines:
        name = figures.mode.rsplit(" (pool", 1)[0]
        if name not in best or figures.docs_per_s > best[name].docs_per_s:
            best[name] = figures
    return (
        {name: _ratio(writer.docs_per_s, b.docs_per_s) for name, b in best.items()},
        {name: _ratio(b.cpu_per_doc_s, writer.cpu_per_doc_s) for name, b in best.items()},
    )


async def run(
    conninfo_server: str,
    *,
    clients: int,
    seconds: float,
    sweep_seconds: float | None,
    rounds_count: int = 1,
) -> dict[str, Any]:
    """Measure every mode in one database and return the figures."""
    async with bench_database(conninfo_server, "pgbatch_bench_ingest") as conninfo:
        info = await server_info(conninfo)
        for line in info.describe():
            print(line)
        commit_p50, commit_p99 = await measure_commit_latency(conninfo)
        print(
            f"commit latency (one-row insert): p50 {fmt_ms(commit_p50)}, p99 {fmt_ms(commit_p99)}"
        )
        print(
            f"writer defaults: lanes={DEFAULT_LANES} max_batch={DEFAULT_MAX_BATCH} "
            f"max_delay_ms={DEFAULT_MAX_DELAY_MS}; {clients} clients, {seconds:.0f} s per mode\n"
        )
        async with Database(conninfo, max_size=1) as db:
            await create_document_tables(db)
        costs = await measure_flush_cost(conninfo)
        fixed_s, per_doc_s = fit_line(costs)
        print(
            "one flush alone: "
            + ", ".join(f"{size} docs {fmt_ms(cost)}" for size, cost in costs.items())
            + f"  =>  t(B) ~ {fmt_ms(fixed_s)} + B * {per_doc_s * 1e6:.0f} us\n"
        )

        rounds = []
        for round_no in range(1, rounds_count + 1):
            if rounds_count > 1:
                print(f"round {round_no}:")
            rounds.append(await run_round(conninfo, clients=clients, seconds=seconds))
        sweep_rows = []
        if sweep_seconds:
            print(f"\nsweep ({sweep_seconds:.0f} s per point):")
            sweep_rows = await sweep(conninfo, clients=clients, seconds=sweep_seconds)

    writer, writer_result, baselines = rounds[-1]
    per_round = [_round_ratios(r_writer, r_baselines) for r_writer, _, r_baselines in rounds]
    ratios = {name: statistics.median(r[0][name] for r in per_round) for name in BASELINE_PATHS}
    cpu_ratios = {name: statistics.median(r[1][name] for r in per_round) for name in BASELINE_PATHS}
    worst_p99_s = max(r_writer.p99_s for r_writer, _, _ in rounds)
    stats = writer_result.stats
    assert stats is not None
    distribution = size_distribution(stats.flush_sizes)
    print(
        f"\nwriter flushes: {stats.flushes} (mean {stats.mean_flush_size:.1f} documents), "
        f"flush p50 {fmt_ms(stats.flush_p50_s)}, p99 {fmt_ms(stats.flush_p99_s)}, "
        f"retries {stats.retries}, max queue depth {stats.max_queue_depth}"
    )
    print(
        "flush sizes:  " + "  ".join(f"{r['sizes']}: {r['items_pct']:.0f}%" for r in distribution)
    )
    lost = sum(
        r_writer.missing_acknowledged + sum(b.missing_acknowledged for b in r_baselines)
        for r_writer, _, r_baselines in rounds
    )
    print(f"acknowledged but not stored: {lost}")
    print()
    for name in BASELINE_PATHS:
        target = (
            f"   target >= {TARGET_RATIO:.0f}x: {verdict(ratios[name] >= TARGET_RATIO)}"
            if name == TARGET_BASELINE
            else ""
        )
        each = ", ".join(f"{r[0][name]:.1f}" for r in per_round)
        print(
            f"ratio writer / {name} (its best pool): {ratios[name]:.1f}x"
            + (f" (median of rounds {each})" if len(rounds) > 1 else "")
            + target
        )
        print(f"  CPU per document, baseline / writer: {cpu_ratios[name]:.1f}x")
    print(
        f"writer p99 {fmt_ms(worst_p99_s)}"
        + (" (worst round)" if len(rounds) > 1 else "")
        + f"   target <= {fmt_ms(TARGET_WRITER_P99_S)}: "
        f"{verdict(worst_p99_s <= TARGET_WRITER_P99_S)}"
    )
    if lost:
        raise SystemExit(f"{lost} acknowledged documents are not stored")
    return {
        "server": asdict(info),
        "commit_p50_s": commit_p50,
        "commit_p99_s": commit_p99,
        "flush_cost_s": costs,
        "flush_fixed_s": fixed_s,
        "flush_per_document_s": per_doc_s,
        "sweep": sweep_rows,
        "clients": clients,
        "seconds_per_mode": seconds,
        "rounds_count": rounds_count,
        "writer_defaults": {
            "lanes": DEFAULT_LANES,
            "max_batch": DEFAULT_MAX_BATCH,
            "max_delay_ms": DEFAULT_MAX_DELAY_MS,
        },
        "modes": [asdict(figures) for figures in (writer, *baselines)],
        "rounds": [
            {
                "modes": [asdict(f) for f in (r_writer, *r_baselines)],
                "ratios": ratios_of_round,
                "cpu_ratios": cpu_of_round,
            }
            for (r_writer, _, r_baselines), (ratios_of_round, cpu_of_round) in zip(
                rounds, per_round, strict=True
            )
        ],
        "writer_p99_worst_round_s": worst_p99_s,
        "ratios": ratios,
        "cpu_ratios": cpu_ratios,
        "target_baseline": TARGET_BASELINE,
        "flushes": stats.flushes,
        "mean_flush_size": stats.mean_flush_size,
        "flush_p50_s": stats.flush_p50_s,
        "flush_p99_s": stats.flush_p99_s,
        "flush_size_distribution": distribution,
        "retries": stats.retries,
    }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("inf")


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=SECONDS_PER_MODE)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--database-url", default=None)
    parser.add_argument(
        "--private-server",
        action="store_true",
        help="start an embedded PostgreSQL of its own in a temporary folder (its WAL and "
        "buffers shared with no other workload of the machine), and stop it at the end",
    )
    parser.add_argument(
        "--rounds", type=int, default=1,
        help="run every mode this many times, interleaved, and report the median ratios "
        "(the machine's speed drifts between minutes: a ratio is best taken within a round)",
    )  # fmt: skip
    parser.add_argument(
        "--sweep", type=float, default=None, metavar="SECONDS",
        help="also run the writer at each settings point of SWEEP for SECONDS each",
    )  # fmt: skip
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        if args.private_server:
            data_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ingest-")))
            url = embedded_url(data_dir)
            stack.callback(stop_embedded, data_dir)
        else:
            url = server_url(args.database_url)
        require_local(url)
        figures = asyncio.run(
            run(
                url,
                clients=args.clients,
                seconds=args.seconds,
                sweep_seconds=args.sweep,
                rounds_count=max(1, args.rounds),
            )
        )
    figures["private_server"] = args.private_server
    path = write_results("ingest", figures)
    print(f"\nfigures written to {path}")


if __name__ == "__main__":
    main()
