"""Throughput of pgbatch end to end, against ceilings of the same server measured in the same run.

Run from the repository root:

    .venv/bin/python benchmarks/throughput.py [--items N] [--shard-sizes 1,10,100,1000]
        [--database-url URL]

To measure another revision's engine with the same benchmark (a same-run baseline), put
its source first on the path: the workers inherit it. For example, with a worktree of
main at /tmp/base: `PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/throughput.py`.

It creates a database `pgbatch_bench_<pid>` on the server (DATABASE_URL, else the embedded
one), measures, prints every figure with its ratio to its ceiling and a PASS/MISS for each
target, writes benchmarks/results/throughput.json, and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from benchmarks.apps import NOOP_TASK, WAKEUP_TASK, make_app
from benchmarks.harness import (
    RESULTS_DIR,
    ServerInfo,
    WorkerProcesses,
    bench_database,
    child_env,
    connect,
    cpu_sample,
    fmt_int,
    fmt_ms,
    percentile,
    python,
    require_local,
    server_info,
    server_pids,
    server_url,
    verdict,
    wait_until,
    write_results,
)
from pgbatch import App, ShardStatus, ok
from pgbatch.db.copy import encode_json, encode_result_rows
from pgbatch.db.shards import ShardCompletion, claim_shards, complete_shards
from pgbatch.sizing import suggest_shard_size

DEFAULT_ITEMS = 1_000_000
SHARD_SIZES = (1, 10, 100, 1000)
# Shard size 1 costs a claim and a completion per item: a million would take minutes, so
# it runs on 100,000 items (which is also the "one batch of 100,000 one-item shards").
ITEMS_CAP = {1: 100_000}
# Shards in flight per worker process. One-item shards need many slots to fill a claim
# (a claim takes at most 256 shards); large shards need few, and more would only make
# each claim statement return more rows.
CONCURRENCY = {1: 256, 10: 128, 100: 32, 1000: 8}
WORKER_PROCESSES = 2
# The hot-row ceiling: this many connections update one row, each in its own commits.
HOT_ROW_CONNECTIONS = 64
HOT_ROW_SECONDS = 5.0
COMMIT_SAMPLES = 300
# Sequential probes of claim + completion statements, per shard size.
OVERHEAD_SAMPLES = 200
OVERHEAD_SHARD_SIZES = (1, 100)
WAKEUP_SAMPLES = 200
WAKEUP_CONCURRENCY = 32
# Pause between wake-up samples so the worker is back in its idle wait each time.
WAKEUP_IDLE_GAP_S = 0.02
# The ceilings' tables: pgbatch.results and pgbatch.items as they were before 0009 stored
# them one row per shard (docs/design/storage-layout.md); the ratios keep their meaning.
RESULTS_CEILING_DDL = """
CREATE TABLE bench_ceiling (
    batch_id bigint NOT NULL, seq bigint NOT NULL, ok boolean NOT NULL, output json,
    error text, traceback_digest bytea,
    PRIMARY KEY (batch_id, seq), CHECK (ok = (error IS NULL)));
CREATE INDEX bench_ceiling_errors_idx ON bench_ceiling (batch_id, seq) WHERE NOT ok;
"""
ITEMS_CEILING_DDL = """
CREATE TABLE bench_ceiling (
    batch_id bigint NOT NULL, seq bigint NOT NULL, payload json NOT NULL,
    PRIMARY KEY (batch_id, seq));
"""
# Rows per COPY write in the ceiling measurements: large, so the client is not the limit.
CEILING_CHUNK_ROWS = 10_000
# Shards of the submit-only batch go to a queue no worker serves, so nothing runs them.
PARKED_QUEUE = "bench-parked"
SUBMIT_SHARD_SIZE = 100
BATCH_TIMEOUT_S = 600.0
# The app every worker process runs.
APP = "benchmarks.apps:app"

# Targets from the issue: ratios to the same-run ceilings.
TARGET_E2E_VS_COPY = 0.5
TARGET_COMPLETIONS_VS_HOT_ROW = 5.0
TARGET_SUBMIT_VS_COPY = 0.5
TARGET_SUBMIT_RSS_MB = 200.0

_OK = ok(None)


def bench_items(count: int) -> Iterator[dict[str, int]]:
    """Yield `count` small JSON items, the payload of every benchmark batch."""
    return ({"n": n} for n in range(count))


# -- ceilings of the server itself ---------------------------------------------------------


async def measure_commit_latency(conninfo: str) -> tuple[float, float]:
    """Return p50 and p99 seconds of a one-row INSERT committed on its own (autocommit)."""
    async with await connect(conninfo) as conn:
        await conn.execute("CREATE TABLE bench_commit (id bigserial PRIMARY KEY, n int)")
        timings: list[float] = []
        for n in range(COMMIT_SAMPLES):  # one commit per sample is what is measured
            started = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit (n) VALUES (%s)", (n,), prepare=True)
            timings.append(time.perf_counter() - started)
        await conn.execute("DROP TABLE bench_commit")
    return statistics.median(timings), percentile(timings, 99)


async def measure_hot_row(conninfo: str) -> float:
    """Return commits/s of HOT_ROW_CONNECTIONS connections incrementing one row in a loop."""
    async with await connect(conninfo) as setup:
        await setup.execute("CREATE TABLE bench_hot (id int PRIMARY KEY, n bigint NOT NULL)")
        await setup.execute("INSERT INTO bench_hot VALUES (1, 0)")
        conns = [await connect(conninfo) for _ in range(HOT_ROW_CONNECTIONS)]
        counts = [0] * len(conns)
        deadline = time.monotonic() + HOT_ROW_SECONDS

        async def hammer(index: int, conn: psycopg.AsyncConnection[Any]) -> None:
            """Increment the hot row until the deadline."""
            while time.monotonic() < deadline:
                await conn.execute("UPDATE bench_hot SET n = n + 1 WHERE id = 1", prepare=True)
                counts[index] += 1

        started = time.perf_counter()
        try:
            await asyncio.gather(*(hammer(i, c) for i, c in enumerate(conns)))
        finally:
            elapsed = time.perf_counter() - started
            for conn in conns:
                await conn.close()
        row = await (await setup.execute("SELECT n FROM bench_hot")).fetchone()
        assert row is not None and row[0] == sum(counts), "hot-row count does not add up"
        await setup.execute("DROP TABLE bench_hot")
    return sum(counts) / elapsed


async def measure_copy_ceiling(conninfo: str, kind: str, rows: int) -> float:
    """Return rows/s of one COPY, in one transaction, of pre-encoded rows into a logged table.

    `kind` "results" writes rows shaped and encoded like pgbatch.results (batch_id, seq, ok,
    output, error); "items" like pgbatch.items (batch_id, seq, payload). Both tables are the
    one-row-per-item tables pgbatch had until migration 0009 (same types, key, checks and
    index), so the ceiling stays what it was when pgbatch stores blocks; only the server's
    work is timed.
    """
    if kind == "results":
        ddl = RESULTS_CEILING_DDL
        chunks = [
            encode_result_rows(1, ((seq, _OK) for seq in _chunk(start, rows)))
            for start in range(0, rows, CEILING_CHUNK_ROWS)
        ]
    else:
        ddl = ITEMS_CEILING_DDL
        chunks = [
            b"".join(b"1\t%d\t%s\n" % (seq, encode_json({"n": seq})) for seq in _chunk(start, rows))
            for start in range(0, rows, CEILING_CHUNK_ROWS)
        ]
    async with await connect(conninfo) as conn:
        await conn.execute(ddl)
        started = time.perf_counter()
        async with conn.transaction():
            columns = "(batch_id, seq, ok, output, error)" if kind == "results" else ""
            async with conn.cursor().copy(f"COPY bench_ceiling {columns} FROM STDIN") as copy:
                for chunk in chunks:
                    await copy.write(chunk)
        elapsed = time.perf_counter() - started
        await conn.execute("DROP TABLE bench_ceiling")
    return rows / elapsed


def _chunk(start: int, rows: int) -> range:
    return range(start, min(start + CEILING_CHUNK_ROWS, rows))


# -- submit alone, in a fresh process --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubmitFigures:
    """A submit of many items measured in a process of its own."""

    items: int
    seconds: float
    rows_per_s: float
    peak_rss_mb: float
    baseline_rss_mb: float


async def _child_submit(conninfo: str, items: int) -> None:
    """Submit `items` items to the parked queue and print the timing as JSON (child side)."""
    app = make_app(conninfo)
    await app.open()
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    batch = await app.submit(
        NOOP_TASK, bench_items(items), shard_size=SUBMIT_SHARD_SIZE, queue=PARKED_QUEUE
    )
    elapsed = time.perf_counter() - started
    await app.close()
    assert batch.total_items == items
    print(json.dumps({"seconds": elapsed, "baseline_kib": baseline_kib}), flush=True)


def _run_submit_child(conninfo: str, items: int) -> SubmitFigures:
    command = [python(), __file__, "--child-submit", str(items), "--database-url", conninfo]
    child = subprocess.Popen(command, env=child_env(conninfo), stdout=subprocess.PIPE)
    assert child.stdout is not None
    output = child.stdout.read()
    # wait4 reaps this very child and returns its own rusage: its peak RSS, nobody else's.
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"the submit process failed with exit code {child.returncode}")
    report = json.loads(output.decode().strip().splitlines()[-1])
    seconds = float(report["seconds"])
    return SubmitFigures(
        items=items,
        seconds=seconds,
        rows_per_s=items / seconds,
        peak_rss_mb=usage.ru_maxrss / 1024,  # ru_maxrss is in KiB on Linux
        baseline_rss_mb=float(report["baseline_kib"]) / 1024,
    )


async def measure_submit(conninfo: str, items: int) -> SubmitFigures:
    """Submit `items` items from a fresh process; return its rows/s and peak RSS."""
    return await asyncio.to_thread(_run_submit_child, conninfo, items)


# -- per-shard overhead: claim and completion statements, sequential ------------------------


@dataclass(frozen=True, slots=True)
class OverheadFigures:
    """Latency of the statements one shard costs, measured one shard at a time."""

    shard_size: int
    claim_p50_s: float
    complete_p50_s: float

    @property
    def total_p50_s(self) -> float:
        """Return claim + completion (the completion includes its commit)."""
        return self.claim_p50_s + self.complete_p50_s


async def measure_shard_overhead(app: App, shard_size: int) -> OverheadFigures:
    """Claim and complete OVERHEAD_SAMPLES shards of `shard_size` one by one; time each step."""
    queue = f"bench-probe-{shard_size}"
    await app.submit(
        NOOP_TASK, bench_items(OVERHEAD_SAMPLES * shard_size), shard_size=shard_size, queue=queue
    )
    claims: list[float] = []
    completes: list[float] = []
    for _ in range(OVERHEAD_SAMPLES):  # one shard at a time: the latency is what is measured
        async with app.db.connection() as conn:
            started = time.perf_counter()
            shards = await claim_shards(
                conn, worker_id="bench-probe", queues=[queue], tasks=[NOOP_TASK], limit=1
            )
            claims.append(time.perf_counter() - started)
        (shard,) = shards
        completion = ShardCompletion.build(
            shard.id,
            shard.batch_id,
            shard.lease_epoch,
            ShardStatus.DONE,
            [(item.seq, _OK) for item in shard.items],
        )

        async def commit(
            conn: psycopg.AsyncConnection[Any], completion: ShardCompletion = completion
        ) -> Any:
            """Complete the shard in this transaction."""
            return await complete_shards(conn, [completion])

        started = time.perf_counter()
        report = await app.db.run_in_transaction(commit)
        completes.append(time.perf_counter() - started)
        # Accepted completions are reported by shard id, or by (shard id, epoch).
        accepted = report.accepted
        assert shard.id in accepted or (shard.id, shard.lease_epoch) in accepted
    return OverheadFigures(shard_size, statistics.median(claims), statistics.median(completes))


# -- end to end with worker processes ---------------------------------------------------------


async def _transactions(conninfo: str) -> int:
    async with await connect(conninfo) as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        row = await (
            await conn.execute(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
        ).fetchone()
    return int(row[0]) if row else 0


@dataclass(frozen=True, slots=True)
class EndToEndFigures:
    """One batch submitted and processed by the worker processes."""

    shard_size: int
    items: int
    shards: int
    concurrency: int
    submit_s: float
    process_s: float
    total_s: float
    machine_cores_busy: float
    worker_cores: float
    server_cores: float
    submitter_cores: float
    transactions_per_shard: float
    cpu_window_s: float

    @property
    def other_cores(self) -> float:
        """Return the cores busy with anything but the workers, the server and this process."""
        ours = self.worker_cores + self.server_cores + self.submitter_cores
        return max(0.0, self.machine_cores_busy - ours)

    @property
    def items_per_s(self) -> float:
        """Return items/s from submit start to the batch finished (committed)."""
        return self.items / self.total_s

    @property
    def process_items_per_s(self) -> float:
        """Return items/s from submit return to the batch finished (the workers' part)."""
        return self.items / self.process_s

    @property
    def shards_per_s(self) -> float:
        """Return shards completed per second while the workers ran."""
        return self.shards / self.process_s

    def cpu_us_per_item(self, cores: float) -> float:
        """Return microseconds of CPU per item for a share of `cores` measured in the run."""
        return cores * self.cpu_window_s / self.items * 1e6

    @property
    def total_cpu_us_per_item(self) -> float:
        """Return microseconds of CPU per item of the workers, the server and the client."""
        ours = self.worker_cores + self.server_cores + self.submitter_cores
        return self.cpu_us_per_item(ours)

    @property
    def submit_rows_per_s(self) -> float:
        """Return item rows/s of the submit alone."""
        return self.items / self.submit_s


async def measure_end_to_end(
    app: App, conninfo: str, shard_size: int, items: int
) -> EndToEndFigures:
    """Submit `items` items at `shard_size` to idle workers; time until the batch finishes."""
    concurrency = CONCURRENCY[shard_size]
    async with WorkerProcesses(
        conninfo, app=APP, count=WORKER_PROCESSES, concurrency=concurrency, label=f"s{shard_size}"
    ) as pool:
        transactions_before = await _transactions(conninfo)
        watched = [*pool.pids, os.getpid(), *await server_pids(conninfo)]
        before = cpu_sample(watched)
        started = time.time()
        batch = await app.submit(NOOP_TASK, bench_items(items), shard_size=shard_size)
        submitted = time.time()
        final = await app.wait(batch.id, timeout_s=BATCH_TIMEOUT_S)
        watched += await server_pids(conninfo)
        after = cpu_sample(watched)
    if final.items_ok != items or final.finished_at is None:
        raise RuntimeError(f"batch {batch.id} ended {final.status} with {final.items_ok} ok")
    transactions = await _transactions(conninfo) - transactions_before
    # finished_at is now() of the flush that finished the batch: its transaction's start,
    # a few ms before its commit, by the server's clock, which is this machine's clock.
    finished = final.finished_at.timestamp()

    def cores(pids: list[int]) -> float:
        """Return the cores `pids` kept busy during the run."""
        return after.cores_since(before, pids)

    server = [p for p in after.processes if p not in pool.pids and p != os.getpid()]
    return EndToEndFigures(
        shard_size=shard_size,
        items=items,
        shards=final.total_shards,
        concurrency=concurrency,
        submit_s=submitted - started,
        process_s=finished - submitted,
        total_s=finished - started,
        machine_cores_busy=after.busy_cores_since(before),
        worker_cores=cores(pool.pids),
        server_cores=cores(server),
        submitter_cores=cores([os.getpid()]),
        transactions_per_shard=transactions / final.total_shards,
        cpu_window_s=after.at - before.at,
    )


# -- idle wake-up -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WakeupFigures:
    """Latency from submit to handler start, and from handler start to the commit."""

    samples: int
    wake_p50_s: float
    wake_p99_s: float
    complete_p50_s: float
    complete_p99_s: float
    submit_call_p50_s: float


@dataclass(slots=True)
class WakeupSamples:
    """Per sample: submit call -> handler start, handler start -> committed, submit call."""

    wakes: list[float] = field(default_factory=list)
    completes: list[float] = field(default_factory=list)
    submit_calls: list[float] = field(default_factory=list)


async def sample_wakeups(app: App, samples: int) -> WakeupSamples:
    """Submit single-item batches one at a time to idle workers (already running).

    Return, per sample, the seconds from the submit call to the handler's start, from the
    handler's start to the batch finished (its completion committed), and how long the
    submit call itself took (it returns after its commit and a read of the batch).
    """
    out = WakeupSamples()
    for n in range(samples):
        await asyncio.sleep(WAKEUP_IDLE_GAP_S)
        submitted = time.time()
        batch = await app.submit(WAKEUP_TASK, [n])
        out.submit_calls.append(time.time() - submitted)

        async def finished(batch_id: int = batch.id) -> bool:
            """Tell whether the batch has ended."""
            return (await app.get_batch(batch_id)).is_final

        await wait_until(finished, timeout_s=30, interval_s=0.002, what="wake-up batch")
        final = await app.get_batch(batch.id)
        assert final.finished_at is not None
        async for _, outcome in app.results(batch.id):
            started = float(outcome.output)
            out.wakes.append(started - submitted)
            out.completes.append(final.finished_at.timestamp() - started)
    return out


async def measure_wakeup(app: App, conninfo: str) -> WakeupFigures:
    """Start idle `pgbatch worker` processes and sample their wake-up latency."""
    async with WorkerProcesses(
        conninfo, app=APP, count=WORKER_PROCESSES, concurrency=WAKEUP_CONCURRENCY, label="wakeup"
    ):
        sampled = await sample_wakeups(app, WAKEUP_SAMPLES)
    return WakeupFigures(
        samples=len(sampled.wakes),
        wake_p50_s=statistics.median(sampled.wakes),
        wake_p99_s=percentile(sampled.wakes, 99),
        complete_p50_s=statistics.median(sampled.completes),
        complete_p99_s=percentile(sampled.completes, 99),
        submit_call_p50_s=statistics.median(sampled.submit_calls),
    )


# -- the run ------------------------------------------------------------------------------------


def _peer_wakeup_p50_s() -> tuple[float, str] | None:
    path = RESULTS_DIR / "peers.json"
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    value = data.get("wakeup", {}).get("pgqueuer_p50_s")
    if value is None:
        return None
    return float(value), str(data.get("server", {}).get("when", "an earlier run"))


async def run(url: str, items: int, sizes: tuple[int, ...] = SHARD_SIZES) -> dict[str, Any]:
    """Measure everything on a fresh database and print the figures as they come."""
    async with bench_database(url, "pgbatch_bench") as conninfo:
        info = await server_info(conninfo)
        _header(info, items)
        app = make_app(conninfo)
        await app.open()
        try:
            return await _measure_all(app, conninfo, info, items, sizes)
        finally:
            await app.close()


async def _measure_all(
    app: App, conninfo: str, info: ServerInfo, items: int, sizes: tuple[int, ...]
) -> dict[str, Any]:
    out = _Printer()
    out.section("Ceilings of this server (no worker running)")
    commit_p50, commit_p99 = await measure_commit_latency(conninfo)
    out.row(
        "commit latency, 1-row INSERT, autocommit",
        f"p50 {fmt_ms(commit_p50)}",
        f"p99 {fmt_ms(commit_p99)}",
    )
    hot_row = await measure_hot_row(conninfo)
    out.row(
        f"hot row: {HOT_ROW_CONNECTIONS} conns, UPDATE n = n + 1, {HOT_ROW_SECONDS:.0f} s",
        f"{fmt_int(hot_row)} commits/s",
    )
    copy_results = await measure_copy_ceiling(conninfo, "results", items)
    out.row(
        f"COPY {fmt_int(items)} result rows, 1 tx, logged + PK", f"{fmt_int(copy_results)} rows/s"
    )
    copy_items = await measure_copy_ceiling(conninfo, "items", items)
    out.row(
        f"COPY {fmt_int(items)} item rows (json), 1 tx, logged + PK",
        f"{fmt_int(copy_items)} rows/s",
    )

    out.section(
        f"Submit alone: {fmt_int(items)} items, shard size {SUBMIT_SHARD_SIZE}, in a fresh process"
    )
    submit = await measure_submit(conninfo, items)
    submit_ratio = submit.rows_per_s / copy_items
    submit_pass = (
        submit_ratio >= TARGET_SUBMIT_VS_COPY and submit.peak_rss_mb < TARGET_SUBMIT_RSS_MB
    )
    out.row(
        "submit",
        f"{fmt_int(submit.rows_per_s)} rows/s",
        f"{submit.seconds:.2f} s",
        f"{submit_ratio:.2f} x COPY ceiling",
    )
    out.row(
        "peak RSS of the submitting process",
        f"{submit.peak_rss_mb:.0f} MB",
        f"(after import + connect: {submit.baseline_rss_mb:.0f} MB)",
    )

    out.section(f"Per-shard overhead, one shard at a time ({OVERHEAD_SAMPLES} samples, p50)")
    overheads = [await measure_shard_overhead(app, s) for s in OVERHEAD_SHARD_SIZES]
    for o in overheads:
        out.row(
            f"shard size {o.shard_size}: claim + completion (with its commit)",
            f"{fmt_ms(o.claim_p50_s)} + {fmt_ms(o.complete_p50_s)}",
            f"= {fmt_ms(o.total_p50_s)}",
        )

    out.section(f"End to end: submit + {WORKER_PROCESSES} worker processes + results committed")
    print(
        "  shard  items      conc  submit/s   process items/s  shards/s  end-to-end/s  "
        "e2e/COPY  cores: machine workers server client other"
    )
    runs: list[EndToEndFigures] = []
    for shard_size in sizes:
        count = min(items, ITEMS_CAP.get(shard_size, items))
        e2e = await measure_end_to_end(app, conninfo, shard_size, count)
        runs.append(e2e)
        print(
            f"  {shard_size:>5}  {count:>9,}  {e2e.concurrency:>4}  "
            f"{fmt_int(e2e.submit_rows_per_s):>9}  {fmt_int(e2e.process_items_per_s):>15}  "
            f"{fmt_int(e2e.shards_per_s):>8}  {fmt_int(e2e.items_per_s):>12}  "
            f"{e2e.items_per_s / copy_results:>8.2f}  "
            f"{e2e.machine_cores_busy:>13.2f} {e2e.worker_cores:>7.2f} "
            f"{e2e.server_cores:>6.2f} {e2e.submitter_cores:>6.2f} "
            f"{e2e.other_cores:>5.2f}",
            flush=True,
        )
    print(
        f"\n  CPU per item, from the same runs (microseconds; workers + server + client), and "
        f"the items/s that {info.cores} idle cores would sustain if CPU were the only limit:"
    )
    for r in runs:
        print(
            f"  shard size {r.shard_size:>4}: {r.total_cpu_us_per_item:7.1f} us = "
            f"{r.cpu_us_per_item(r.worker_cores):6.1f} workers + "
            f"{r.cpu_us_per_item(r.server_cores):6.1f} server + "
            f"{r.cpu_us_per_item(r.submitter_cores):5.1f} client  ->  "
            f"{fmt_int(info.cores / r.total_cpu_us_per_item * 1e6):>9} items/s"
        )
    capped = {s: c for s, c in ITEMS_CAP.items() if c < items}
    for shard_size, cap in capped.items():
        print(f"  (shard size {shard_size} runs on {fmt_int(cap)} items to stay under a minute)")
    print(
        f"  concurrency = shards in flight per worker process; cores = CPU cores kept busy "
        f"on average (of {info.cores}): the whole machine, the {WORKER_PROCESSES} workers, "
        f"every process of the PostgreSQL server (backends, WAL writer, checkpointer, I/O "
        f"workers, autovacuum), this process (submit, watch), and anything else running"
    )

    by_size = {r.shard_size: r for r in runs}
    # --shard-sizes may leave out shard size 1 (its section) or 100 (the e2e target).
    one = by_size.get(1)
    completion_ratio = float("nan")
    overhead_cpu_s = 0.0
    if one is not None:
        out.section(f"One batch of {fmt_int(one.items)} one-item shards (the shard size 1 run)")
        completion_ratio = one.shards_per_s / hot_row
        out.row(
            "completions/s",
            f"{fmt_int(one.shards_per_s)}",
            f"{completion_ratio:.1f} x hot-row ceiling ({fmt_int(hot_row)}/s)",
        )
        out.row(
            "transactions per shard (claims, completions, heartbeats)",
            f"{one.transactions_per_shard:.3f}",
        )
        out.row(
            "enqueue (submit alone) at shard size 1", f"{fmt_int(one.submit_rows_per_s)} rows/s"
        )
        # Machine time per shard: what the shard-size-1 run spends per shard beyond the
        # per-item cost measured where shards are large.
        big = by_size[max(sizes)]
        overhead_cpu_s = 1 / one.shards_per_s - 1 / big.process_items_per_s

    out.section(f"Idle wake-up ({WAKEUP_SAMPLES} single-item batches, one at a time)")
    wake = await measure_wakeup(app, conninfo)
    out.row(
        "submit -> handler start",
        f"p50 {fmt_ms(wake.wake_p50_s)}",
        f"p99 {fmt_ms(wake.wake_p99_s)}",
    )
    out.row(
        "the submit call itself (returns after its commit)", f"p50 {fmt_ms(wake.submit_call_p50_s)}"
    )
    out.row(
        "handler start -> batch finished (committed)",
        f"p50 {fmt_ms(wake.complete_p50_s)}",
        f"p99 {fmt_ms(wake.complete_p99_s)}",
    )

    out.section("Sizing inputs (docs/performance.md)")
    o_latency = next(o for o in overheads if o.shard_size == 1)
    out.row("c: commit latency (p50)", fmt_ms(commit_p50))
    out.row(
        "o: claim + completion statements, latency (p50, s=1) - c",
        fmt_ms(max(0.0, o_latency.total_p50_s - commit_p50)),
    )
    out.row("o_cpu: machine time per shard under load (s=1 vs s=1000)", fmt_ms(overhead_cpu_s))
    for item_s in (0.0001, 0.001, 0.1, 1.0):
        hint = suggest_shard_size(
            item_s=item_s,
            overhead_s=max(o_latency.total_p50_s - commit_p50, overhead_cpu_s),
            commit_s=commit_p50,
            lease_ttl_s=30.0,
        )
        out.row(
            f"suggest_shard_size(t={fmt_ms(item_s)}, L=30 s)",
            f"s = {hint.shard_size}",
            f"({hint.note})",
        )

    s100 = by_size.get(100)
    e2e_ratio = s100.items_per_s / copy_results if s100 is not None else float("nan")
    peer = _peer_wakeup_p50_s()
    out.section("Targets")
    out.target(
        f"shard size 100 end to end >= {TARGET_E2E_VS_COPY} x COPY ceiling",
        f"{e2e_ratio:.2f} x",
        e2e_ratio >= TARGET_E2E_VS_COPY,
    )
    out.target(
        f"completions/s >= {TARGET_COMPLETIONS_VS_HOT_ROW:.0f} x hot-row ceiling",
        f"{completion_ratio:.1f} x",
        completion_ratio >= TARGET_COMPLETIONS_VS_HOT_ROW,
    )
    out.target(
        f"submit >= {TARGET_SUBMIT_VS_COPY} x COPY ceiling, peak RSS < "
        f"{TARGET_SUBMIT_RSS_MB:.0f} MB",
        f"{submit_ratio:.2f} x, {submit.peak_rss_mb:.0f} MB",
        submit_pass,
    )
    if peer is None:
        print("  wake-up p50 <= PgQueuer's: no figure yet (run benchmarks/peers.py first)")
    else:
        peer_p50, when = peer
        out.target(
            f"wake-up p50 <= PgQueuer's ({fmt_ms(peer_p50)}, peers.py at {when})",
            fmt_ms(wake.wake_p50_s),
            wake.wake_p50_s <= peer_p50,
        )

    return {
        "server": asdict(info),
        "items": items,
        "commit_latency_s": {"p50": commit_p50, "p99": commit_p99},
        "hot_row_commits_per_s": hot_row,
        "copy_ceiling_rows_per_s": {"results": copy_results, "items": copy_items},
        "submit": asdict(submit),
        "shard_overhead": [asdict(o) | {"total_p50_s": o.total_p50_s} for o in overheads],
        "overhead_cpu_s": overhead_cpu_s,
        "end_to_end": [
            asdict(r)
            | {
                "cpu_us_per_item": r.total_cpu_us_per_item,
                "items_per_s": r.items_per_s,
                "process_items_per_s": r.process_items_per_s,
                "shards_per_s": r.shards_per_s,
                "submit_rows_per_s": r.submit_rows_per_s,
            }
            for r in runs
        ],
        "wakeup": asdict(wake),
        "ratios": {
            "e2e_s100_vs_copy": e2e_ratio,
            "completions_vs_hot_row": completion_ratio,
            "submit_vs_copy": submit_ratio,
        },
    }


class _Printer:
    """Aligned output: sections, figure rows and target lines."""

    LABEL_WIDTH = 62

    def section(self, title: str) -> None:
        """Print a section title."""
        print(f"\n{title}", flush=True)

    def row(self, label: str, *figures: str) -> None:
        """Print a labelled row of figures."""
        print(f"  {label:<{self.LABEL_WIDTH}} {'  '.join(figures)}", flush=True)

    def target(self, label: str, figure: str, passed: bool) -> None:
        """Print a target with its verdict."""
        print(f"  {verdict(passed)}  {label:<{self.LABEL_WIDTH}} {figure}", flush=True)


def _header(info: ServerInfo, items: int) -> None:
    print("pgbatch throughput benchmark")
    for line in info.describe():
        print(f"  {line}")
    print(
        f"  items per run: {fmt_int(items)}; worker processes: {WORKER_PROCESSES}; "
        "the database is created for this run and dropped at the end"
    )
    print(
        "  note: the client, the workers and the server share these cores, and other "
        "processes on the machine add noise: compare ratios, not absolute rates"
    )


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--items", type=int, default=DEFAULT_ITEMS, help="items per run (default 1,000,000)"
    )
    parser.add_argument(
        "--database-url", help="server to use (default: DATABASE_URL, else the embedded one)"
    )
    parser.add_argument(
        "--shard-sizes",
        default=",".join(map(str, SHARD_SIZES)),
        help="end-to-end shard sizes, comma-separated (default 1,10,100,1000)",
    )
    parser.add_argument("--child-submit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.items < 1000:
        parser.error("--items must be at least 1000")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or, with --child-submit, the submit-only child)."""
    args = _parse_args(argv)
    if args.child_submit is not None:
        asyncio.run(_child_submit(args.database_url, args.child_submit))
        return
    url = server_url(args.database_url)
    require_local(url)
    sizes = tuple(int(size) for size in args.shard_sizes.split(","))
    figures = asyncio.run(run(url, args.items, sizes))
    path = write_results("throughput", figures)
    print(f"\nfigures written to {path}")


if __name__ == "__main__":
    main()
