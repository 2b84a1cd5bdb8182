"""`pgbatch serve` and Ctrl-C: exit 0, and `--with-worker` drains like `pgbatch worker`."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbatch
from tests.apps.chaos_app import build_app
from tests.helpers import CHAOS_APP, REPO_ROOT, subprocess_env, wait_until

SERVE_ENV = {"PGBATCH_RESCUE_INTERVAL_S": "0.2", "PGBATCH_POLL_INTERVAL_S": "0.2"}
# A serve process starts (imports, pool, migrations, uvicorn) well within this.
START_S = 30.0
# A process that drains one slow shard exits well within this after the signal.
EXIT_S = 30.0


class Serve:
    """One `pgbatch serve` subprocess, its output in a log file."""

    def __init__(self, database_url: str, log_path: Path, *args: str) -> None:
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pgbatch", "serve", "--port", "0", *args],
                cwd=REPO_ROOT, env=subprocess_env(database_url, SERVE_ENV),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def log(self) -> str:
        """Return what the process printed so far."""
        return self.log_path.read_text(errors="replace")

    async def wait_exit(self) -> int:
        """Wait for the process to end; return its exit code."""
        await wait_until(lambda: self.process.poll() is not None, EXIT_S, message=self.log)
        assert self.process.returncode is not None
        return self.process.returncode


@pytest.fixture
def serves(database_url: str, tmp_path: Path) -> Iterator[list[Serve]]:
    started: list[Serve] = []
    yield started
    for serve in started:
        if serve.process.poll() is None:
            serve.process.kill()
            serve.process.wait(10)
        print(serve.log())  # shown by pytest only when the test failed


async def _shard_states(conn: psycopg.AsyncConnection[Any], batch_id: int) -> list[str]:
    cur = await conn.execute(
        "SELECT status FROM pgbatch.shards WHERE batch_id = %s ORDER BY id", (batch_id,)
    )
    return [row[0] for row in await cur.fetchall()]


@pytest.mark.asyncio
async def test_ctrl_c_stops_serve_with_worker_after_draining_its_shards(
    database_url: str, tmp_path: Path, serves: list[Serve]
) -> None:
    app = build_app(pgbatch.Settings(database_url=database_url))
    async with app:
        batch = await app.submit("slow", range(10))  # 2 shards of SLOW_SHARD_S each
    serve = Serve(database_url, tmp_path / "serve.log", "--app", CHAOS_APP, "--with-worker",
                  "--concurrency", "1")  # fmt: skip
    serves.append(serve)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:

        async def one_running() -> bool:
            return "running" in await _shard_states(conn, batch.id)

        await wait_until(one_running, START_S, message=serve.log)
        serve.process.send_signal(signal.SIGINT)
        assert await serve.wait_exit() == 0, serve.log()
        # The shard in flight finished (done with no failed item: its row is gone, its
        # batch counts it); the other was never claimed; none is left running.
        assert await _shard_states(conn, batch.id) == ["queued"], serve.log()
        cur = await conn.execute(
            "SELECT shards_done FROM pgbatch.batches WHERE id = %s", (batch.id,)
        )
        assert await cur.fetchone() == (1,), serve.log()
    output = serve.log()
    assert "Traceback" not in output, output
    assert "draining" in output, output
    assert "1 shard completed" in output, output  # the worker's stop summary


@pytest.mark.asyncio
async def test_ctrl_c_stops_serve_with_exit_zero_and_no_tasks_warns(
    database_url: str, tmp_path: Path, serves: list[Serve]
) -> None:
    serve = Serve(database_url, tmp_path / "serve.log")
    serves.append(serve)
    await wait_until(lambda: "Uvicorn running" in serve.log(), START_S, message=serve.log)
    serve.process.send_signal(signal.SIGINT)
    assert await serve.wait_exit() == 0, serve.log()
    output = serve.log()
    assert "Traceback" not in output, output
    assert "warning: no tasks registered (no --app given)" in output, output
