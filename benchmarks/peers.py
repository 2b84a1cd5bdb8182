"""pgbatch against PgQueuer, Procrastinate and Graphile Worker: no-op jobs/s, same server and run.

Run from the repository root (the Python peers are in pyproject's `bench` extra; Graphile
Worker and a Node.js to run it are installed from npm into benchmarks/.peers/ on the first
run, see benchmarks/peer_graphile.py, and skipped with a message where npm cannot):

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python benchmarks/peers.py [--jobs N] [--procrastinate-jobs N] [--rounds R]
        [--database-url URL] [--no-graphile]

Each system gets a fresh database on the same server, its jobs enqueued before its two
worker processes are told to start, and is timed from that signal to its last completion
committed (the server's timestamp of it). pgbatch runs the same no-op work as one batch of
one-item shards (shard size 1), which is how a job queue's unit of work maps onto it.
Each drain also counts the CPU seconds of the server's processes and the two workers over
the drain (per job), and how busy the whole machine was: on a server that other clients use
too (a shared PG15), the server's share includes theirs.
Figures go to benchmarks/results/peers.json, where throughput.py finds PgQueuer's wake-up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from psycopg.conninfo import make_conninfo

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.apps import NOOP_TASK, make_app
from benchmarks.harness import (
    RESULTS_DIR,
    CpuSample,
    bench_database,
    child_env,
    connect,
    cpu_sample,
    fmt_int,
    fmt_ms,
    listening_processes,
    percentile,
    python,
    require_local,
    server_info,
    server_pids,
    server_url,
    spawn,
    stop_processes,
    verdict,
    wait_until,
    write_results,
)
from benchmarks.peer_graphile import GraphileDrain, GraphileProbe, GraphileRuntime, ensure_runtime
from benchmarks.peer_workers import (
    PGQUEUER_NOOP,
    PGQUEUER_WAKEUP,
    PROCRASTINATE_NOOP,
    asyncpg_params,
    procrastinate_app,
)
from benchmarks.throughput import WAKEUP_IDLE_GAP_S, sample_wakeups

DEFAULT_JOBS = 50_000
# Procrastinate claims and finishes one job per statement, and so does Graphile Worker without
# its batching: a few hundred jobs/s, so they get fewer jobs to keep each run under a minute.
DEFAULT_PROCRASTINATE_JOBS = 10_000
# Every system runs this many times, interleaved, and its median counts: on a shared
# 2-core machine one run can be off by a factor of two.
DEFAULT_ROUNDS = 3
WORKER_PROCESSES = 2
WAKEUP_SAMPLES = 200
WAKEUP_WARMUP = 5
READY_TIMEOUT_S = 60.0
RUN_TIMEOUT_S = 600.0
# How often completion is checked; the end time is the server's timestamp of the last
# completion, so this only bounds how long the check lags.
DONE_POLL_S = 0.05

TARGET_VS_PGQUEUER = 1.5
TARGET_VS_PROCRASTINATE = 20.0
# Issue 13: pgbatch at shard size 1 against Graphile Worker at its best setting.
TARGET_VS_GRAPHILE = 1.0
# Graphile keeps no completion time (a finished job is deleted), so its drain ends when a
# probe first sees its table empty: this often, on one kept connection.
GRAPHILE_POLL_S = 0.01


@dataclass(frozen=True, slots=True)
class Config:
    """One way to run a system: the worker options and what they mean."""

    system: str
    label: str
    worker_args: tuple[str, ...]
    description: str
    # A few hundred jobs/s: runs the smaller --procrastinate-jobs count, to stay under a minute.
    slow: bool = False


# pgbatch as its workers ship: 256 one-item shards in flight per process (one claim fills
# them all), default asyncio loop.
PGBATCH = Config(
    "pgbatch",
    "pgbatch s=1",
    ("--concurrency", "256"),
    "shard size 1, 2 processes x concurrency 256, asyncio, fsync'd commits",
)
# PgQueuer 1.6.0: asyncpg, uvloop, one direct connection per QueueManager, durable
# (logged) tables with its recommended autovacuum settings (`pgq autovac`), no retries, no
# concurrency limits. Its own benchmark (tools/benchmark.py, drain strategy) runs 5
# managers with batch size 10; its tuning guide says to raise batch_size for short jobs.
# Each setting below is run and the best one is compared.
PGQUEUER = (
    Config(
        "pgqueuer",
        "PgQueuer 5x10",
        ("--managers", "5", "--batch-size", "10", "--uvloop"),
        "2 processes x 5 QueueManagers, batch_size 10 (its benchmark's defaults), uvloop",
    ),
    Config(
        "pgqueuer",
        "PgQueuer 2x50",
        ("--managers", "2", "--batch-size", "50", "--uvloop"),
        "2 processes x 2 QueueManagers, batch_size 50, uvloop",
    ),
    Config(
        "pgqueuer",
        "PgQueuer 1x100",
        ("--managers", "1", "--batch-size", "100", "--uvloop"),
        "2 processes x 1 QueueManager, batch_size 100, uvloop",
    ),
)
# Graphile Worker 0.18.0 on Node 24 (node-postgres pool, prepared statements, LISTEN/NOTIFY,
# a finished job deleted). Its performance page's configuration is concurrentJobs 24,
# maxPoolSize 25, localQueue 500 and both batch delays 0; its option docs say a much larger
# local queue may pay for very fast jobs, so 5,000 is run too, and the plain pool without
# batching (its defaults but concurrency) shows what batching buys.
_GRAPHILE_POOL = ("--concurrency", "24", "--max-pool-size", "25")
_GRAPHILE_BATCHING = ("--complete-batch-delay", "0", "--fail-batch-delay", "0")
GRAPHILE = (
    Config(
        "graphile",
        "Graphile docs",
        (*_GRAPHILE_POOL, "--local-queue", "500", *_GRAPHILE_BATCHING),
        "2 processes x concurrentJobs 24, pool 25, localQueue 500, batch delays 0 "
        "(its performance page)",
    ),
    Config(
        "graphile",
        "Graphile lq5000",
        (*_GRAPHILE_POOL, "--local-queue", "5000", *_GRAPHILE_BATCHING),
        "2 processes x concurrentJobs 24, pool 25, localQueue 5000, batch delays 0",
    ),
    Config(
        "graphile",
        "Graphile plain",
        _GRAPHILE_POOL,
        "2 processes x concurrentJobs 24, pool 25, no local queue, no batching",
        slow=True,
    ),
)
# Procrastinate 3.10.0: psycopg pool, LISTEN/NOTIFY on, jobs kept (delete_jobs=never,
# its default), no retry; concurrency is its knob for I/O-bound jobs.
PROCRASTINATE = Config(
    "procrastinate",
    "Procrastinate",
    ("--concurrency", "20"),
    "2 processes x concurrency 20 (pool of 22), listen_notify, no retry",
    slow=True,
)


@dataclass(frozen=True, slots=True)
class DrainFigures:
    """One system working through a queue of no-op jobs."""

    label: str
    description: str
    jobs: int
    enqueue_s: float
    drain_s: float
    # CPU seconds of the server's processes and of the worker processes over the drain.
    server_cpu_s: float
    workers_cpu_s: float
    # How many of the machine's cores were busy, on average, over the CPU window (the drain,
    # and the completion check's lag after it).
    machine_cores: float
    cpu_window_s: float

    @property
    def jobs_per_s(self) -> float:
        """Return jobs completed per second."""
        return self.jobs / self.drain_s

    @property
    def cpu_per_job_s(self) -> float:
        """Return server plus worker CPU seconds per job."""
        return (self.server_cpu_s + self.workers_cpu_s) / self.jobs

    @property
    def other_cores(self) -> float:
        """Return the cores kept busy by anything but the server and the workers."""
        ours = (self.server_cpu_s + self.workers_cpu_s) / self.cpu_window_s
        return max(0.0, self.machine_cores - ours)


# -- each system's schema, enqueue and completion check ---------------------------------------


@dataclass
class _System:
    """How to install, fill and watch one system's database."""

    install: Callable[[str], Awaitable[None]]
    enqueue: Callable[[str, int], Awaitable[Any]]
    done: Callable[[str, int, Any], Awaitable[bool]]
    last_completion: Callable[[str, Any], Awaitable[float]]
    drain_flag: tuple[str, ...] = field(default=())
    # The worker's command line for (conninfo, worker args); None: benchmarks.peer_workers.
    command: Callable[[str, tuple[str, ...]], list[str]] | None = None
    poll_s: float = DONE_POLL_S


async def _pgbatch_install(conninfo: str) -> None:
    app = make_app(conninfo)
    await app.open()  # applies the migrations
    await app.close()


async def _pgbatch_enqueue(conninfo: str, jobs: int) -> int:
    app = make_app(conninfo)
    await app.open()
    try:
        batch = await app.submit(NOOP_TASK, ({"n": n} for n in range(jobs)), shard_size=1)
    finally:
        await app.close()
    return batch.id


async def _pgbatch_done(conninfo: str, jobs: int, batch_id: Any) -> bool:
    async with await connect(conninfo) as conn:
        row = await (
            await conn.execute(
                "SELECT finished_at IS NOT NULL, items_ok FROM pgbatch.batches WHERE id = %s",
                (batch_id,),
            )
        ).fetchone()
    if row is None or not row[0]:
        return False
    if row[1] != jobs:
        raise RuntimeError(f"pgbatch batch ended with {row[1]} of {jobs} items ok")
    return True


async def _pgbatch_last(conninfo: str, batch_id: Any) -> float:
    async with await connect(conninfo) as conn:
        row = await (
            await conn.execute(
                "SELECT extract(epoch FROM finished_at) FROM pgbatch.batches WHERE id = %s",
                (batch_id,),
            )
        ).fetchone()
    assert row is not None
    return float(row[0])


async def _pgqueuer_queries(conninfo: str) -> Any:
    import asyncpg  # type: ignore[import-untyped]
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.queries import Queries

    connection = await asyncpg.connect(**asyncpg_params(conninfo))
    return Queries(AsyncpgDriver(connection)), connection


async def _pgqueuer_install(conninfo: str) -> None:
    queries, connection = await _pgqueuer_queries(conninfo)
    try:
        await queries.install()
        await queries.optimize_autovacuum()  # `pgq autovac`, its tuning guide's checklist
    finally:
        await connection.close()


async def _pgqueuer_enqueue(conninfo: str, jobs: int) -> None:
    queries, connection = await _pgqueuer_queries(conninfo)
    try:
        # Its batch enqueue: one statement for all jobs.
        await queries.enqueue([PGQUEUER_NOOP] * jobs, [None] * jobs, [0] * jobs)
    finally:
        await connection.close()


async def _pgqueuer_done(conninfo: str, jobs: int, _: Any) -> bool:
    async with await connect(conninfo) as conn:
        # A completed job is deleted from the queue table and logged, in one statement.
        row = await (await conn.execute("SELECT EXISTS (SELECT 1 FROM pgqueuer)")).fetchone()
        if row is None or row[0]:
            return False
        row = await (
            await conn.execute(
                "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful' AND entrypoint = %s",
                (PGQUEUER_NOOP,),
            )
        ).fetchone()
    if row is None or row[0] != jobs:
        raise RuntimeError(f"PgQueuer logged {row[0] if row else 0} of {jobs} jobs successful")
    return True


async def _pgqueuer_last(conninfo: str, _: Any) -> float:
    async with await connect(conninfo) as conn:
        row = await (
            await conn.execute("SELECT extract(epoch FROM max(created)) FROM pgqueuer_log")
        ).fetchone()
    assert row is not None
    return float(row[0])


async def _procrastinate_install(conninfo: str) -> None:
    app = procrastinate_app(conninfo)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def _procrastinate_enqueue(conninfo: str, jobs: int) -> None:
    app = procrastinate_app(conninfo)
    async with app.open_async():
        # Its batch defer: one statement for all jobs.
        await app.tasks[PROCRASTINATE_NOOP].batch_defer_async(*({} for _ in range(jobs)))


async def _procrastinate_done(conninfo: str, jobs: int, _: Any) -> bool:
    async with await connect(conninfo) as conn:
        row = await (
            await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM procrastinate_jobs WHERE status IN ('todo', 'doing'))"
            )
        ).fetchone()
        if row is None or row[0]:
            return False
        row = await (
            await conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")
        ).fetchone()
    if row is None or row[0] != jobs:
        raise RuntimeError(f"Procrastinate finished {row[0] if row else 0} of {jobs} jobs")
    return True


async def _procrastinate_last(conninfo: str, _: Any) -> float:
    async with await connect(conninfo) as conn:
        row = await (
            await conn.execute(
                "SELECT extract(epoch FROM max(at)) FROM procrastinate_events "
                "WHERE type = 'succeeded'"
            )
        ).fetchone()
    assert row is not None
    return float(row[0])


def _graphile_system(runtime: GraphileRuntime) -> _System:
    """Return Graphile Worker's install, bulk add and completion check on `runtime`."""
    drain = GraphileDrain(runtime)

    def command(conninfo: str, args: tuple[str, ...]) -> list[str]:
        """Return one Graphile Worker process's command line."""
        return runtime.command("work", conninfo, args)

    return _System(
        drain.install,
        drain.enqueue,
        drain.done,
        drain.last_completion,
        command=command,
        poll_s=GRAPHILE_POLL_S,
    )


# Graphile Worker joins at run time, once its runtime is installed (see run()).
SYSTEMS: dict[str, _System] = {
    "pgbatch": _System(_pgbatch_install, _pgbatch_enqueue, _pgbatch_done, _pgbatch_last),
    "pgqueuer": _System(
        _pgqueuer_install, _pgqueuer_enqueue, _pgqueuer_done, _pgqueuer_last, ("--drain",)
    ),
    "procrastinate": _System(
        _procrastinate_install,
        _procrastinate_enqueue,
        _procrastinate_done,
        _procrastinate_last,
        ("--drain",),
    ),
}


# -- worker processes ---------------------------------------------------------------------------


class PeerWorkers:
    """Two benchmarks.peer_workers processes, held at their start gate until go()."""

    def __init__(self, config: Config, conninfo: str, *, extra: Sequence[str] = ()) -> None:
        self.config = config
        self.conninfo = conninfo
        self.extra = tuple(extra)
        self.processes: list[asyncio.subprocess.Process] = []
        self.lines: asyncio.Queue[str] = asyncio.Queue()
        self._readers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> PeerWorkers:
        try:
            for index in range(WORKER_PROCESSES):
                # Each process's connections carry its name, so pg_stat_activity tells them.
                named = make_conninfo(self.conninfo, application_name=f"{self._name_prefix}{index}")
                own_command = SYSTEMS[self.config.system].command
                if own_command is not None:
                    command = own_command(named, (*self.config.worker_args, *self.extra))
                else:
                    command = [
                        python(), "-m", "benchmarks.peer_workers", self.config.system,
                        "--conninfo", named, *self.config.worker_args, *self.extra,
                    ]  # fmt: skip
                log = RESULTS_DIR / "logs" / f"peer-{self.config.system}-{index}.log"
                process = await spawn(command, env=child_env(named), log=log, pipes=True)
                self.processes.append(process)
                await asyncio.wait_for(self._read_until_ready(process), READY_TIMEOUT_S)
                self._readers.append(asyncio.create_task(self._read_lines(process)))
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop_processes(self.processes)
        for reader in self._readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    @property
    def pids(self) -> list[int]:
        """Return the worker processes' ids."""
        return [p.pid for p in self.processes]

    async def go(self) -> None:
        """Release every process from its start gate."""
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
            await process.stdin.drain()

    async def wait_listening(self) -> None:
        """Wait until every process has its LISTEN in place (so a NOTIFY wakes it)."""

        async def listening() -> bool:
            """Tell whether every process has its LISTEN in place."""
            count = await listening_processes(self.conninfo, self._name_prefix)
            return count >= len(self.processes)

        await wait_until(listening, timeout_s=READY_TIMEOUT_S, what="workers listening")

    @property
    def _name_prefix(self) -> str:
        return f"bench-peer-{self.config.system}-"

    @staticmethod
    async def _read_until_ready(process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while True:
            line = await process.stdout.readline()
            if not line:
                raise RuntimeError(f"worker exited before it was ready; see {RESULTS_DIR}/logs")
            if line.strip() == b"READY":
                return

    async def _read_lines(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        while line := await process.stdout.readline():
            await self.lines.put(line.decode().strip())


# -- measurements -------------------------------------------------------------------------------


async def measure_drain(url: str, config: Config, jobs: int) -> DrainFigures:
    """Enqueue `jobs` no-op jobs, release two workers, time until the last completion."""
    system = SYSTEMS[config.system]
    async with bench_database(url, f"pgbatch_peers_{config.system}") as conninfo:
        await system.install(conninfo)
        started = time.perf_counter()
        handle = await system.enqueue(conninfo, jobs)
        enqueue_s = time.perf_counter() - started
        try:
            async with PeerWorkers(config, conninfo, extra=system.drain_flag) as workers:
                server = await server_pids(conninfo)
                parents = (server[0], os.getpid()) if server else (os.getpid(),)
                before = _mark(parents, [*server, *workers.pids])
                released = time.time()
                await workers.go()

                async def done() -> bool:
                    """Tell whether every job has completed."""
                    return await system.done(conninfo, jobs, handle)

                await wait_until(
                    done, timeout_s=RUN_TIMEOUT_S, interval_s=system.poll_s, what="drain"
                )
                # Backends started during the drain count whole (see cores_since).
                server = sorted({*server, *await server_pids(conninfo)})
                after = _mark(parents, [*server, *workers.pids])
                last = await system.last_completion(conninfo, handle)
        finally:
            if isinstance(handle, GraphileProbe) and handle.conn is not None:
                await handle.conn.close()
    return DrainFigures(
        config.label,
        config.description,
        jobs,
        enqueue_s,
        last - released,
        server_cpu_s=_cpu_used(before, after, parents[0], server) if len(parents) > 1 else 0.0,
        workers_cpu_s=_cpu_used(before, after, os.getpid(), workers.pids),
        machine_cores=after.sample.busy_cores_since(before.sample),
        cpu_window_s=after.sample.at - before.sample.at,
    )


@dataclass(frozen=True, slots=True)
class _CpuMark:
    """CPU times of watched processes, and of the children that their parents have reaped."""

    sample: CpuSample
    reaped: dict[int, float]  # parent pid -> CPU seconds of its exited, reaped children


def _mark(parents: Sequence[int], pids: Sequence[int]) -> _CpuMark:
    """Sample `pids`, and the CPU time of the children that each of `parents` has reaped."""
    reaped: dict[int, float] = {}
    for parent in parents:
        reaped[parent] = 0.0
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(parent).cpu_times()
            reaped[parent] = times.children_user + times.children_system
    return _CpuMark(cpu_sample(pids), reaped)


def _cpu_used(before: _CpuMark, after: _CpuMark, parent: int, pids: Sequence[int]) -> float:
    """Return the CPU seconds `pids` (children of `parent`) used between the two marks.

    PgQueuer and Procrastinate workers exit when their queue is empty, and their backends
    with them, before the second mark can read them: their time is found in what the
    parent (this process, the postmaster) has reaped since, less what they had used by the
    first mark. Backends of anyone else that exited meanwhile count too (the completion
    probes' connections here; other clients' on a shared server).
    """
    wall = after.sample.at - before.sample.at
    used = after.sample.cores_since(before.sample, pids) * wall
    gone = {p for p in pids if p in before.sample.processes and p not in after.sample.processes}
    used += after.reaped[parent] - before.reaped[parent]
    return used - sum(before.sample.processes[p][0] for p in gone)


async def measure_pgqueuer_wakeup(url: str, config: Config) -> tuple[list[float], list[float]]:
    """Enqueue single jobs one at a time to idle PgQueuer workers; time each handler start.

    Return the latencies and how long each enqueue call itself took.
    """
    system = SYSTEMS["pgqueuer"]
    latencies: list[float] = []
    calls: list[float] = []
    async with bench_database(url, "pgbatch_peers_pgqueuer_wake") as conninfo:
        await system.install(conninfo)
        queries, connection = await _pgqueuer_queries(conninfo)
        try:
            async with PeerWorkers(config, conninfo) as workers:
                await workers.go()
                # Its LISTEN shares a connection with its dequeues, so pg_stat_activity
                # cannot show it: the first samples warm up and are dropped instead.
                for n in range(-WAKEUP_WARMUP, WAKEUP_SAMPLES):
                    await asyncio.sleep(WAKEUP_IDLE_GAP_S)
                    submitted = time.time()
                    await queries.enqueue(PGQUEUER_WAKEUP, str(n).encode())
                    call = time.time() - submitted
                    started = await asyncio.wait_for(_wake_time(workers, str(n)), 30)
                    if n >= 0:
                        latencies.append(started - submitted)
                        calls.append(call)

                    async def idle() -> bool:
                        """Tell whether the queue is empty again."""
                        return not await connection.fetchval(
                            "SELECT EXISTS (SELECT 1 FROM pgqueuer)"
                        )

                    await wait_until(idle, timeout_s=30, interval_s=0.002, what="job logged")
        finally:
            await connection.close()
    return latencies, calls


async def _wake_time(workers: PeerWorkers, payload: str) -> float:
    while True:
        parts = (await workers.lines.get()).split()
        if len(parts) == 3 and parts[0] == "WAKE" and parts[1] == payload:
            return float(parts[2])


async def measure_pgbatch_wakeup(url: str) -> tuple[list[float], list[float]]:
    """Submit single-item batches one at a time to idle pgbatch workers; time handler starts."""
    async with bench_database(url, "pgbatch_peers_pgbatch_wake") as conninfo:
        app = make_app(conninfo)
        await app.open()
        try:
            wake_config = Config("pgbatch", "pgbatch", ("--concurrency", "32"), "")
            async with PeerWorkers(wake_config, conninfo) as workers:
                await workers.go()
                await workers.wait_listening()
                sampled = await sample_wakeups(app, WAKEUP_SAMPLES)
        finally:
            await app.close()
    return sampled.wakes, sampled.submit_calls


# -- the run ------------------------------------------------------------------------------------


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"{package} is not installed: .venv/bin/pip install -e '.[bench]'"
        ) from None


async def _graphile(
    url: str, enabled: bool
) -> tuple[tuple[Config, ...], dict[str, str], str | None]:
    """Install Graphile Worker's runtime if need be; return its configs, versions, or why not."""
    if not enabled:
        return (), {}, "--no-graphile"
    runtime = await ensure_runtime()
    if isinstance(runtime, str):
        return (), {}, runtime
    # Its schema on a scratch database first: a server it cannot use is a skip, not a
    # failure in the middle of the rounds.
    try:
        async with bench_database(url, "pgbatch_peers_graphile_check") as conninfo:
            await GraphileDrain(runtime).install(conninfo)
    except RuntimeError as error:
        lines = str(error).splitlines()
        return (), {}, next((line for line in lines if "rror" in line), lines[0])
    SYSTEMS["graphile"] = _graphile_system(runtime)
    return GRAPHILE, runtime.versions, None


async def run(
    url: str, jobs: int, procrastinate_jobs: int, rounds: int, *, graphile: bool = True
) -> dict[str, Any]:
    """Run every system on its own fresh database and print the comparison."""
    versions = {p: _version(p) for p in ("pgqueuer", "procrastinate", "asyncpg", "psycopg")}
    async with bench_database(url, "pgbatch_peers_info") as conninfo:
        info = await server_info(conninfo)
    print(
        "pgbatch vs PgQueuer, Procrastinate and Graphile Worker: no-op jobs, same server, same run"
    )
    for line in info.describe():
        print(f"  {line}")
    graphile_configs, graphile_versions, skipped = await _graphile(url, graphile)
    versions |= {f"graphile:{k}": v for k, v in graphile_versions.items()}
    print(
        f"  PgQueuer {versions['pgqueuer']} (asyncpg {versions['asyncpg']}), "
        f"Procrastinate {versions['procrastinate']} (psycopg {versions['psycopg']}), "
        + (
            f"Graphile Worker {graphile_versions['graphile-worker']} (Node "
            f"{graphile_versions['node']}, pg {graphile_versions['pg']}); "
            if skipped is None
            else "Graphile Worker skipped; "
        )
        + f"{WORKER_PROCESSES} worker processes each; each system in its own fresh database"
    )
    if skipped is not None:
        print(f"  Graphile Worker skipped: {skipped}")
    print(
        "  timed from releasing the workers (jobs already enqueued) to the last completion "
        "committed; the machine is shared, so compare ratios"
    )
    print(
        "  CPU/job: the server's processes and the workers over the drain; 'other' is the "
        "cores the rest of the machine kept busy meanwhile"
    )

    print(
        f"\nThroughput (jobs/s): {rounds} rounds, the systems interleaved in each, so that "
        "load from elsewhere on the machine falls on all of them; the median counts"
    )
    results: list[DrainFigures] = []

    async def one(config: Config, count: int, round_no: int) -> None:
        """Measure one system once and print its line."""
        figures = await measure_drain(url, config, count)
        results.append(figures)
        print(
            f"  round {round_no}  {figures.label:<16} {fmt_int(figures.jobs_per_s):>8} jobs/s  "
            f"({fmt_int(count)} jobs in {figures.drain_s:.2f} s; enqueue "
            f"{fmt_int(count / figures.enqueue_s)}/s; CPU/job "
            f"{figures.cpu_per_job_s * 1e6:.0f} us = server "
            f"{figures.server_cpu_s / count * 1e6:.0f} + workers "
            f"{figures.workers_cpu_s / count * 1e6:.0f}; other {figures.other_cores:.2f} cores)",
            flush=True,
        )

    for round_no in range(1, rounds + 1):
        await one(PGBATCH, jobs, round_no)
        for config in PGQUEUER:
            await one(config, jobs, round_no)
        for config in graphile_configs:
            await one(config, procrastinate_jobs if config.slow else jobs, round_no)
        await one(PROCRASTINATE, procrastinate_jobs, round_no)

    def of(config: Config) -> list[DrainFigures]:
        """Return the figures of a configuration over the rounds."""
        return [r for r in results if r.label == config.label]

    def median_rate(config: Config) -> float:
        """Return the median jobs/s of a configuration over the rounds."""
        return statistics.median(r.jobs_per_s for r in of(config))

    def median_cpu(config: Config) -> float:
        """Return the median server plus worker CPU seconds per job of a configuration."""
        return statistics.median(r.cpu_per_job_s for r in of(config))

    measured = (PGBATCH, *PGQUEUER, *graphile_configs, PROCRASTINATE)
    print("\n  median of the rounds (jobs/s, CPU per job), and the configuration of each:")
    for config in measured:
        print(
            f"  {config.label:<16} {fmt_int(median_rate(config)):>8} jobs/s  "
            f"{median_cpu(config) * 1e6:>5.0f} us  {config.description}"
        )
    other = statistics.median(r.other_cores for r in results)
    print(f"  other processes kept {other:.2f} cores busy (median over all drains)")
    best_pgqueuer = max(PGQUEUER, key=median_rate)
    pgbatch_rate = median_rate(PGBATCH)
    pgqueuer_rate = median_rate(best_pgqueuer)
    procrastinate_rate = median_rate(PROCRASTINATE)
    best_graphile = max(graphile_configs, key=median_rate) if graphile_configs else None

    print(f"\nIdle wake-up: submit -> handler start ({WAKEUP_SAMPLES} samples, one at a time)")
    pgq_wakes, pgq_calls = await measure_pgqueuer_wakeup(url, best_pgqueuer)
    pgb_wakes, pgb_calls = await measure_pgbatch_wakeup(url)
    for label, wakes, calls in (
        ("pgbatch", pgb_wakes, pgb_calls),
        (best_pgqueuer.label, pgq_wakes, pgq_calls),
    ):
        print(
            f"  {label:<16} p50 {fmt_ms(statistics.median(wakes))}  "
            f"p99 {fmt_ms(percentile(wakes, 99))}  "
            f"(the enqueue call itself: p50 {fmt_ms(statistics.median(calls))})"
        )

    vs_pgqueuer = pgbatch_rate / pgqueuer_rate
    vs_procrastinate = pgbatch_rate / procrastinate_rate
    pgb_p50, pgq_p50 = statistics.median(pgb_wakes), statistics.median(pgq_wakes)
    print("\nTargets")
    print(
        f"  {verdict(vs_pgqueuer >= TARGET_VS_PGQUEUER)}  pgbatch / PgQueuer >= "
        f"{TARGET_VS_PGQUEUER}: {vs_pgqueuer:.2f} x (against its best: {best_pgqueuer.label})"
    )
    print(
        f"  {verdict(vs_procrastinate >= TARGET_VS_PROCRASTINATE)}  pgbatch / Procrastinate >= "
        f"{TARGET_VS_PROCRASTINATE:.0f}: {vs_procrastinate:.1f} x"
    )
    vs_graphile: float | None = None
    if best_graphile is not None:
        vs_graphile = pgbatch_rate / median_rate(best_graphile)
        print(
            f"  {verdict(vs_graphile >= TARGET_VS_GRAPHILE)}  pgbatch / Graphile Worker >= "
            f"{TARGET_VS_GRAPHILE}: {vs_graphile:.2f} x (against its best: {best_graphile.label})"
        )
    else:
        print(
            f"  SKIP  pgbatch / Graphile Worker >= {TARGET_VS_GRAPHILE}: not measured ({skipped})"
        )
    print(
        f"  {verdict(pgb_p50 <= pgq_p50)}  wake-up p50 pgbatch <= PgQueuer: "
        f"{fmt_ms(pgb_p50)} vs {fmt_ms(pgq_p50)}"
    )
    return {
        "server": asdict(info),
        "versions": versions,
        "graphile_skipped": skipped,
        "drain": [
            asdict(r)
            | {
                "jobs_per_s": r.jobs_per_s,
                "cpu_per_job_s": r.cpu_per_job_s,
                "other_cores": r.other_cores,
            }
            for r in results
        ],
        "median_jobs_per_s": {c.label: median_rate(c) for c in measured},
        "median_cpu_per_job_s": {c.label: median_cpu(c) for c in measured},
        "ratios": {
            "pgbatch_vs_pgqueuer": vs_pgqueuer,
            "pgbatch_vs_procrastinate": vs_procrastinate,
            "pgbatch_vs_graphile": vs_graphile,
            "graphile_config": best_graphile.label if best_graphile else None,
        },
        "wakeup": {
            "pgbatch_p50_s": pgb_p50,
            "pgbatch_p99_s": percentile(pgb_wakes, 99),
            "pgqueuer_p50_s": pgq_p50,
            "pgqueuer_p99_s": percentile(pgq_wakes, 99),
            "pgqueuer_config": best_pgqueuer.label,
            "pgbatch_submit_call_p50_s": statistics.median(pgb_calls),
            "pgqueuer_enqueue_call_p50_s": statistics.median(pgq_calls),
        },
    }


def main(argv: list[str] | None = None) -> None:
    """Run the comparison and write benchmarks/results/peers.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--jobs", type=int, default=DEFAULT_JOBS, help="pgbatch, PgQueuer, Graphile"
    )
    parser.add_argument(
        "--procrastinate-jobs",
        type=int,
        default=DEFAULT_PROCRASTINATE_JOBS,
        help="the slow ones: Procrastinate, Graphile without batching",
    )
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="repeats (median)")
    parser.add_argument(
        "--no-graphile", action="store_true", help="leave Graphile Worker (and npm) out"
    )
    parser.add_argument(
        "--database-url", help="server to use (default: DATABASE_URL, else the embedded one)"
    )
    args = parser.parse_args(argv)
    url = server_url(args.database_url)
    require_local(url)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    figures = asyncio.run(
        run(url, args.jobs, args.procrastinate_jobs, args.rounds, graphile=not args.no_graphile)
    )
    print(f"\nfigures written to {write_results('peers', figures)}")


if __name__ == "__main__":
    main()
