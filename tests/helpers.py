"""Small shared test helpers: polling with a deadline, worker processes and the CLI."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

REPO_ROOT = Path(__file__).resolve().parent.parent
# The test app every worker process of the acceptance and chaos tests runs.
CHAOS_APP = "tests.apps.chaos_app:app"
# Polling period of every wait below: short against the waits themselves (seconds).
POLL_INTERVAL_S = 0.05
# Lines of a worker's log shown when a test fails.
LOG_TAIL_LINES = 80

Predicate = Callable[[], Any | Awaitable[Any]]


async def poll(
    predicate: Predicate, timeout_s: float, *, interval_s: float = POLL_INTERVAL_S
) -> Any:
    """Call `predicate` (sync or async) until it returns a truthy value or time runs out.

    Return the last value it returned, truthy or not.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value or time.monotonic() >= deadline:
            return value
        await asyncio.sleep(min(interval_s, max(0.0, deadline - time.monotonic())))


async def wait_until(
    predicate: Predicate,
    timeout_s: float,
    *,
    interval_s: float = POLL_INTERVAL_S,
    message: str | Callable[[], str] = "",
) -> Any:
    """Poll `predicate` until it is truthy and return its value; fail after `timeout_s`."""
    value = await poll(predicate, timeout_s, interval_s=interval_s)
    if not value:
        detail = message() if callable(message) else message
        name = getattr(predicate, "__name__", repr(predicate))
        raise AssertionError(f"timed out after {timeout_s} s waiting for {name}. {detail}")
    return value


async def port_in_log(read: Callable[[], str], prefix: str, timeout_s: float) -> int:
    """Wait until a subprocess that bound port 0 prints `prefix` and its port; return it.

    Picking a free port here and passing it on races the other xdist worker (and
    anything else on the machine) for it: the process may then talk to another test's
    server, or fail to bind.
    """
    pattern = re.compile(re.escape(prefix) + r"(\d+)")

    def bound() -> int | None:
        found = pattern.search(read())
        return int(found.group(1)) if found else None

    port: int = await wait_until(bound, timeout_s, message=read)
    return port


def subprocess_env(database_url: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return the environment of a pgbatch subprocess on the test's database."""
    env = dict(os.environ)
    env["DATABASE_URL"] = database_url
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + path if path else "")
    # Wide enough that Rich never wraps a table row the tests look for.
    env["COLUMNS"] = "200"
    env.update(extra or {})
    return env


class WorkerProcess:
    """One `pgbatch worker` process; its stdout and stderr go to a log file."""

    def __init__(
        self,
        database_url: str,
        log_path: Path,
        *,
        app: str = CHAOS_APP,
        concurrency: int = 4,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.log_path = log_path
        self.command = [
            sys.executable, "-m", "pgbatch", "worker",
            "--app", app, "--concurrency", str(concurrency), *args,
        ]  # fmt: skip
        self.env = subprocess_env(database_url, env)
        self.stalled = False
        self.terminated = False
        with open(log_path, "ab") as log:
            log.write(f"--- start: {' '.join(self.command[1:])}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.pid = self.process.pid

    @property
    def alive(self) -> bool:
        """Tell whether the process has not exited yet."""
        return self.process.poll() is None

    def send(self, sig: signal.Signals) -> None:
        """Send `sig` if the process still runs (never to a recycled pid: Popen checks)."""
        if self.alive:
            self.process.send_signal(sig)

    def terminate(self) -> None:
        """Send SIGTERM once: a graceful drain (a second SIGTERM would stop it at once)."""
        if not self.terminated:
            self.resume()
            self.send(signal.SIGTERM)
            self.terminated = True

    def kill(self) -> None:
        """SIGKILL the process and reap it."""
        self.send(signal.SIGKILL)
        self.process.wait(10)
        self.stalled = False

    def stall(self) -> None:
        """Freeze the process (SIGSTOP): its leases lapse while it still holds them."""
        self.send(signal.SIGSTOP)
        self.stalled = True

    def resume(self) -> None:
        """Let a frozen process run again (SIGCONT)."""
        if self.stalled:
            self.send(signal.SIGCONT)
            self.stalled = False

    async def wait_exit(self, timeout_s: float) -> int:
        """Wait for the process to exit and return its exit code; fail after `timeout_s`."""
        await wait_until(
            lambda: not self.alive, timeout_s, message=lambda: "worker log:\n" + self.log_tail()
        )
        code = self.process.returncode
        assert code is not None
        return code

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the process whatever its state: SIGCONT, SIGTERM, then SIGKILL if needed."""
        self.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Return the last lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class WorkerGroup:
    """The worker processes of one test: started on demand, all stopped at teardown."""

    def __init__(self, database_url: str, log_dir: Path, *, env: Mapping[str, str] | None = None):
        self.database_url = database_url
        self.log_dir = log_dir
        self.env = dict(env or {})
        self.processes: list[WorkerProcess] = []

    def start(
        self,
        *,
        name: str = "worker",
        concurrency: int = 4,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> WorkerProcess:
        """Start a worker process whose output is appended to `<log_dir>/<name>.log`."""
        process = WorkerProcess(
            self.database_url,
            self.log_dir / f"{name}.log",
            concurrency=concurrency,
            args=args,
            env={**self.env, **(env or {})},
        )
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        """Stop every process still running."""
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.stop()

    def logs(self) -> str:
        """Return the tail of every log file, for a failure report."""
        seen: dict[Path, WorkerProcess] = {p.log_path: p for p in self.processes}
        return "\n".join(
            f"===== {path.name} =====\n{process.log_tail()}" for path, process in seen.items()
        )


@dataclass(frozen=True, slots=True)
class CliResult:
    """What one `pgbatch` command printed and how it exited."""

    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        """Return stdout and stderr together."""
        return self.stdout + self.stderr


async def run_cli(
    *args: str,
    database_url: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
) -> CliResult:
    """Run `python -m pgbatch ARGS` from the repository root and capture its output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pgbatch",
        *args,
        cwd=REPO_ROOT,
        env=subprocess_env(database_url, env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


async def fetch_one(database_url: str, sql: str, params: Any = None) -> Any:
    """Run one query on a short-lived connection and return its first row."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchone()


async def fetch_all(database_url: str, sql: str, params: Any = None) -> list[Any]:
    """Run one query on a short-lived connection and return every row."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(sql, params)
        return await cur.fetchall()


def has_pgvector(url: str) -> bool:
    """Return whether the server at `url` can create the pgvector extension."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    return bool(row and row[0])


def register_noop(app: Any) -> None:
    """Register task "t" (every item ok) and callback "cb" (does nothing) on a pgbatch App."""
    import pgbatch

    @app.task(name="t")
    async def noop(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.ok() for _ in items]

    @app.callback(name="cb")
    async def cb(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        return None
