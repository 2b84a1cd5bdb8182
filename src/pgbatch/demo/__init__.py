"""`pgbatch demo`: the LLM-batch example end to end, with worker processes and a read-back."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from pgbatch.app import App
from pgbatch.db.verify import verify_batch
from pgbatch.errors import ConfigurationError
from pgbatch.progress import watch_batch

__all__ = ["run_demo"]

EXAMPLE_MODULE = "pgbatch.demo.llm_app"
# The callback runs after the batch ends; the demo waits this long for it at most.
CALLBACK_WAIT_S = 30.0
WORKER_STOP_WAIT_S = 30.0


def _load_example() -> Any:
    return importlib.import_module(EXAMPLE_MODULE)


async def _wait_for_callback(app: App, batch_id: int) -> None:
    deadline = time.monotonic() + CALLBACK_WAIT_S
    while time.monotonic() < deadline:
        async with app.db.connection() as conn:
            if (await verify_batch(conn, batch_id)).callbacks_done >= 1:
                return
        await asyncio.sleep(0.1)


def _start_workers(count: int, concurrency: int, url: str) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "DATABASE_URL": url}
    command = [
        sys.executable, "-m", "pgbatch", "worker",
        "--app", f"{EXAMPLE_MODULE}:app", "--concurrency", str(concurrency),
    ]  # fmt: skip
    return [
        subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]


def _stop_workers(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(WORKER_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class _Dashboard:
    http: Any  # uvicorn.Server
    task: asyncio.Task[None]


def _loopback_socket(port: int) -> socket.socket:
    # Bound here rather than by uvicorn, which exits the process when the port is taken.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.bind(("127.0.0.1", 0))
    return sock


async def _start_dashboard(app: App, port: int, console: Console) -> _Dashboard:
    """Serve the API and dashboard on loopback while the demo runs (any free port if taken)."""
    from pgbatch.api.server import server

    sock = _loopback_socket(port)
    bound = sock.getsockname()[1]
    http = server(app, host="127.0.0.1", port=bound, log_level="critical")
    serving = asyncio.create_task(http.serve(sockets=[sock]))
    console.print(f"dashboard: [bold]http://127.0.0.1:{bound}/[/] (live while the demo runs)")
    return _Dashboard(http, serving)


async def _stop_dashboard(dashboard: _Dashboard | None) -> None:
    if dashboard is not None:
        dashboard.http.should_exit = True
        with contextlib.suppress(Exception):
            await dashboard.task


async def run_demo(
    *,
    items: int,
    workers: int,
    concurrency: int,
    console: Console,
    port: int | None = 8000,
    keep_serving: bool = False,
) -> None:
    """Submit `items` prompts, process them with worker processes, and verify the outcome.

    With a `port`, the dashboard is served on loopback meanwhile (`keep_serving`: until
    Ctrl-C after the demo).
    """
    example = _load_example()
    app: App = example.app
    await app.open()
    processes: list[subprocess.Popen[bytes]] = []
    dashboard = await _start_dashboard(app, port, console) if port is not None else None
    try:
        where = (
            app.settings.database_url and "DATABASE_URL"
        ) or f"embedded ({app.settings.data_dir})"
        console.print(
            f"[bold]pgbatch demo[/]: {items:,} prompts, {workers} worker processes, "
            f"PostgreSQL: {where}"
        )
        started = time.monotonic()
        batch = await app.submit("summarize", example.prompts(items), on_complete="notify_done")
        submitted = time.monotonic() - started
        console.print(
            f"submitted batch {batch.id} ({batch.total_shards} shards) in {submitted:.2f} s"
        )
        processes = _start_workers(workers, concurrency, app.db.url)
        final = await watch_batch(app, batch.id, console=console)
        elapsed = time.monotonic() - started
        await _wait_for_callback(app, batch.id)
        async with app.db.connection() as conn:
            check = await verify_batch(conn, batch.id)
            duplicate_responses, responses, notifications = await example.verify(app, batch.id)
    finally:
        _stop_workers(processes)
        if not keep_serving:
            await _stop_dashboard(dashboard)
            with contextlib.suppress(Exception):
                await app.close()

    table = Table(title=f"batch {batch.id}: read back from the database")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_column("expected", justify="right")
    rows = [
        ("status", str(final.status), "succeeded"),
        ("items", f"{check.items:,}", f"{items:,}"),
        ("items ok", f"{check.results_ok:,}", ""),
        ("items failed (model errors)", f"{check.results - check.results_ok:,}", "about 1%"),
        ("items without a result", f"{check.items_without_result:,}", "0"),
        ("responses stored", f"{responses:,}", f"{check.results_ok:,}"),
        ("duplicates found", f"{duplicate_responses:,}", "0"),
        ("batch completed", f"{check.callbacks_inserted} time(s)", "1"),
        ("callback ran", f"{notifications} time(s)", "1"),
        ("elapsed (submit to done)", f"{elapsed:.1f} s", ""),
        ("throughput", f"{items / elapsed:,.0f} items/s" if elapsed else "-", ""),
    ]
    for name, value, expected in rows:
        table.add_row(name, value, expected)
    console.print(table)
    healthy = (
        check.every_item_has_one_result
        and duplicate_responses == 0
        and responses == check.results_ok
        and check.callbacks_inserted == 1
        and notifications == 1
    )
    if not healthy:
        raise ConfigurationError("verification failed: see the table above")
    console.print("[green]verified:[/] every item has exactly one result; completed once.")
    if keep_serving and dashboard is not None:
        console.print("the dashboard stays up; Ctrl-C to stop")
        try:
            await dashboard.task
        finally:
            await app.close()
