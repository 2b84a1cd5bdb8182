"""What every benchmark needs: a fresh database, worker processes, timings and verdicts.

Benchmarks talk only to this machine: the embedded server's Unix socket or a loopback
address. Each run creates its own database on that server and drops it at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import platform
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

import pgbatch
from pgbatch.db.database import resolve_url

__all__ = [
    "RESULTS_DIR",
    "ROOT",
    "CpuSample",
    "ServerInfo",
    "WorkerProcesses",
    "bench_database",
    "child_env",
    "connect",
    "cpu_sample",
    "fmt_int",
    "fmt_ms",
    "listening_processes",
    "percentile",
    "python",
    "require_local",
    "server_info",
    "server_pids",
    "server_url",
    "spawn",
    "stop_processes",
    "verdict",
    "wait_until",
    "write_results",
]

ROOT = Path(__file__).resolve().parent.parent
# Figures of each run land here as JSON (git-ignored); docs/performance.md quotes them.
RESULTS_DIR = ROOT / "benchmarks" / "results"
# A worker drains in-flight shards on SIGTERM; past this it is killed.
STOP_TIMEOUT_S = 30.0
_LOOPBACK_HOSTS = ("localhost", "127.", "::1")
# Per-process CPU times come in clock ticks (1/100 s on Linux).
CPU_TICK_S = 0.01
# Worker processes start (imports, pool, LISTEN) well within this.
WORKER_READY_TIMEOUT_S = 60.0


def server_url(explicit: str | None) -> str:
    """Return the server to benchmark: --database-url, else DATABASE_URL, else embedded."""
    if explicit:
        return explicit
    # Settings reads DATABASE_URL; without it this starts (or joins) the embedded server.
    return resolve_url(pgbatch.Settings())


def require_local(url: str) -> None:
    """Refuse any server that is not on this machine (a Unix socket or a loopback address)."""
    hosts = conninfo_to_dict(url).get("host") or ""
    for host in str(hosts).split(","):
        if host and not host.startswith("/") and not host.startswith(_LOOPBACK_HOSTS):
            raise SystemExit(
                f"refusing to benchmark {host!r}: benchmarks run only against this machine "
                "(the embedded server's socket, localhost or 127.0.0.1)"
            )


async def connect(conninfo: str) -> psycopg.AsyncConnection[Any]:
    """Open an autocommit connection."""
    return await psycopg.AsyncConnection.connect(conninfo, autocommit=True)


@contextlib.asynccontextmanager
async def bench_database(url: str, prefix: str) -> AsyncIterator[str]:
    """Create a database `<prefix>_<pid>` for this run, yield its conninfo, then drop it."""
    name = f"{prefix}_{os.getpid()}"
    admin = make_conninfo(url, dbname="postgres")
    async with await connect(admin) as conn:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(url, dbname=name)
    finally:
        async with await connect(admin) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What the figures were measured on."""

    postgres: str
    settings: dict[str, str]
    cores: int
    cpu_model: str
    memory_gib: float
    python: str
    when: str

    def describe(self) -> list[str]:
        """Return the lines that head a benchmark's output."""
        settings = ", ".join(f"{k}={v}" for k, v in self.settings.items())
        return [
            f"machine: {self.cores} cores ({self.cpu_model}), {self.memory_gib:.0f} GiB, "
            f"Python {self.python}",
            f"server: {self.postgres}",
            f"server settings: {settings}",
            f"run at {self.when}",
        ]


# Settings that move the figures; printed so that two runs can be compared.
_SHOWN_SETTINGS = (
    "synchronous_commit",
    "fsync",
    "wal_sync_method",
    "shared_buffers",
    "work_mem",
    "max_wal_size",
    "max_connections",
)


async def server_info(conninfo: str) -> ServerInfo:
    """Read the server version and settings, and describe this machine."""
    async with await connect(conninfo) as conn:
        row = await (await conn.execute("SELECT version()")).fetchone()
        version = str(row[0]).split(" on ")[0] if row else "unknown"
        settings: dict[str, str] = {}
        for name in _SHOWN_SETTINGS:
            value = await (await conn.execute(f"SHOW {name}")).fetchone()
            settings[name] = str(value[0]) if value else "?"
    return ServerInfo(
        postgres=version,
        settings=settings,
        cores=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        memory_gib=psutil.virtual_memory().total / 2**30,
        python=platform.python_version(),
        when=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


async def spawn(
    command: Sequence[str], *, env: dict[str, str], log: Path, pipes: bool = False
) -> asyncio.subprocess.Process:
    """Start a child process whose stderr goes to `log` (stdin/stdout piped if `pipes`)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            *command,
            env=env,
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE if pipes else asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )


async def stop_processes(processes: Sequence[asyncio.subprocess.Process]) -> None:
    """Ask each process to stop (SIGTERM), wait for it, and kill it past the timeout."""
    for process in processes:
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


async def wait_until(
    probe: Any, *, timeout_s: float, interval_s: float = 0.02, what: str = "condition"
) -> None:
    """Poll the async `probe()` until it returns true, or raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await probe():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s:.0f} s")
        await asyncio.sleep(interval_s)


@dataclass(frozen=True, slots=True)
class CpuSample:
    """CPU seconds used so far by the whole machine and by chosen processes."""

    at: float  # time.monotonic()
    machine_busy_s: float
    # pid -> (CPU seconds so far, creation time)
    processes: dict[int, tuple[float, float]]

    def busy_cores_since(self, earlier: CpuSample) -> float:
        """Return how many cores the whole machine kept busy, on average, since `earlier`."""
        wall = self.at - earlier.at
        return (self.machine_busy_s - earlier.machine_busy_s) / wall if wall > 0 else 0.0

    def cores_since(self, earlier: CpuSample, pids: Sequence[int]) -> float:
        """Return the cores `pids` kept busy since `earlier`, on average.

        A process absent from `earlier` was started since (the caller samples every
        process it watches at both ends) and counts whole, unless it used more CPU than a
        process could in the window: then it is an older one that `earlier` missed, and it
        cannot be attributed.
        """
        wall = self.at - earlier.at
        used = 0.0
        for pid in set(pids):
            if pid not in self.processes:
                continue
            cpu, created = self.processes[pid]
            if pid in earlier.processes and earlier.processes[pid][1] == created:
                used += cpu - earlier.processes[pid][0]
            elif cpu <= wall + CPU_TICK_S:
                used += cpu
        return used / wall if wall > 0 else 0.0


def cpu_sample(pids: Sequence[int] = ()) -> CpuSample:
    """Sample the machine's busy CPU time and the CPU time of `pids` (gone ones are skipped)."""
    times = psutil.cpu_times()
    # guest time is already part of user time on Linux
    idle = times.idle + getattr(times, "iowait", 0.0)
    guest = getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    busy = sum(times) - idle - guest
    per_process: dict[int, tuple[float, float]] = {}
    for pid in set(pids):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            cpu = process.cpu_times()
            per_process[pid] = (cpu.user + cpu.system, process.create_time())
    return CpuSample(time.monotonic(), busy, per_process)


def percentile(values: Sequence[float], q: float) -> float:
    """Return the q-th percentile (0..100) of `values`, nearest rank."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def verdict(passed: bool) -> str:
    """Return PASS or MISS."""
    return "PASS" if passed else "MISS"


def fmt_int(value: float) -> str:
    """Format a rate or count with thousands separators."""
    return f"{value:,.0f}"


def fmt_ms(seconds: float) -> str:
    """Format seconds as milliseconds."""
    return f"{seconds * 1000:.2f} ms"


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write a run's figures to benchmarks/results/<name>.json and return the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


async def server_pids(conninfo: str) -> list[int]:
    """Return the pids of every process of the server: postmaster, backends, background.

    The server must run on this machine (it does: see require_local). In PostgreSQL 18 the
    I/O workers, the WAL writer and the checkpointer do part of every write, so a figure of
    "server CPU" has to count them, not only the backends.
    """
    async with await connect(conninfo) as conn:
        row = await (await conn.execute("SELECT pg_backend_pid()")).fetchone()
        assert row is not None
        # Ask while the connection is open: its backend exits when it closes.
        try:
            postmaster = psutil.Process(int(row[0])).parent()
            if postmaster is None:
                return []
            return [postmaster.pid, *(child.pid for child in postmaster.children())]
        except psutil.Error:
            return []


async def listening_processes(conninfo: str, name_prefix: str) -> int:
    """Count the child processes (by application_name prefix) that have a LISTEN in place."""
    async with await connect(conninfo) as conn:
        row = await (
            await conn.execute(
                "SELECT count(DISTINCT application_name) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE %s "
                "AND query ILIKE 'LISTEN%%'",
                (name_prefix + "%",),
            )
        ).fetchone()
    return int(row[0]) if row else 0


def child_env(conninfo: str, application_name: str | None = None) -> dict[str, str]:
    """Return the environment of a child process working on `conninfo`.

    With `application_name`, the child's connections carry it, so that the benchmark can
    tell them apart in pg_stat_activity.
    """
    if application_name is not None:
        conninfo = make_conninfo(conninfo, application_name=application_name)
    return {
        **os.environ,
        "DATABASE_URL": conninfo,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        # Children log warnings only: a log line per shard would be a benchmark of logging.
        "PYTHONUNBUFFERED": "1",
    }


def python() -> str:
    """Return the interpreter running this benchmark (the venv's)."""
    return sys.executable


class WorkerProcesses:
    """`pgbatch worker` processes of `app` on the bench database, around a run."""

    def __init__(
        self, conninfo: str, *, app: str, count: int, concurrency: int, label: str
    ) -> None:
        self.conninfo = conninfo
        self.app = app
        self.count = count
        self.concurrency = concurrency
        self.label = label
        self.processes: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> WorkerProcesses:
        command = [
            python(), "-m", "pgbatch", "worker",
            "--app", self.app, "--concurrency", str(self.concurrency),
        ]  # fmt: skip
        for index in range(self.count):
            log = RESULTS_DIR / "logs" / f"worker-{self.label}-{index}.log"
            env = child_env(self.conninfo, f"{self._name_prefix}{index}")
            self.processes.append(await spawn(command, env=env, log=log))
        try:
            await wait_until(
                self._all_listening, timeout_s=WORKER_READY_TIMEOUT_S, what="workers listening"
            )
        except BaseException:
            await stop_processes(self.processes)
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await stop_processes(self.processes)
        failed = [p.returncode for p in self.processes if p.returncode not in (0, None)]
        if failed:
            print(f"  warning: a worker exited with {failed}; see {RESULTS_DIR / 'logs'}")

    @property
    def _name_prefix(self) -> str:
        return f"bench-{self.label}-"

    async def _all_listening(self) -> bool:
        for process in self.processes:
            if process.returncode is not None:
                raise RuntimeError(
                    f"worker exited with {process.returncode}; see {RESULTS_DIR / 'logs'}"
                )
        # A worker is ready once its LISTEN connection is up: it then claims on NOTIFY.
        listening = await listening_processes(self.conninfo, self._name_prefix)
        return listening >= len(self.processes)

    @property
    def pids(self) -> list[int]:
        """Return the worker processes' ids."""
        return [p.pid for p in self.processes]
