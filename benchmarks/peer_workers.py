"""Worker processes for peers.py: pgbatch, PgQueuer or Procrastinate on the same no-op work.

    python -m benchmarks.peer_workers SYSTEM --conninfo CONNINFO [options]

Each process connects, registers a no-op task and a wake-up task, prints READY, and waits
for a line on stdin before it starts working, so that start-up is outside the timing. It
works until SIGTERM, or with --drain until its queue is empty (PgQueuer, Procrastinate).
A wake-up handler prints `WAKE <payload> <time.time()>` the moment it starts (PgQueuer and
Procrastinate); pgbatch's returns that time as the item's output instead.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from psycopg.conninfo import conninfo_to_dict

__all__ = [
    "PGQUEUER_NOOP",
    "PGQUEUER_WAKEUP",
    "PROCRASTINATE_NOOP",
    "PROCRASTINATE_WAKEUP",
    "asyncpg_params",
    "main",
    "procrastinate_app",
]

PGQUEUER_NOOP = "noop"
PGQUEUER_WAKEUP = "wakeup"
PROCRASTINATE_NOOP = "noop"
PROCRASTINATE_WAKEUP = "wakeup"


def asyncpg_params(conninfo: str) -> dict[str, Any]:
    """Translate a libpq conninfo into asyncpg.connect() keyword arguments."""
    params = conninfo_to_dict(conninfo)
    out: dict[str, Any] = {"database": params.get("dbname"), "user": params.get("user")}
    if params.get("host"):
        out["host"] = params["host"]
    if params.get("port"):
        out["port"] = int(str(params["port"]))
    if params.get("password"):
        out["password"] = params["password"]
    if params.get("application_name"):
        out["server_settings"] = {"application_name": str(params["application_name"])}
    return out


async def _gate() -> None:
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def _on_sigterm(stop: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)


def _wake_line(payload: str) -> None:
    print(f"WAKE {payload} {time.time()!r}", flush=True)


async def run_pgbatch(args: argparse.Namespace) -> None:
    """Run one pgbatch worker (the benchmark app's tasks) until SIGTERM."""
    from benchmarks.apps import make_app

    app = make_app(args.conninfo)
    await app.open()
    worker = app.worker(concurrency=args.concurrency)
    await _gate()
    _on_sigterm(worker.request_stop)
    try:
        await worker.run()
    finally:
        await app.close()


async def run_pgqueuer(args: argparse.Namespace) -> None:
    """Run `--managers` PgQueuer queue managers, each on its own asyncpg connection."""
    import asyncpg  # type: ignore[import-untyped]
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.types import QueueExecutionMode

    managers: list[PgQueuer] = []
    for _ in range(args.managers):
        # PgQueuer's tuning guide: a direct connection (not a pool) per QueueManager.
        connection = await asyncpg.connect(**asyncpg_params(args.conninfo))
        pgq = PgQueuer(AsyncpgDriver(connection))

        @pgq.entrypoint(PGQUEUER_NOOP)
        async def noop(job: Job) -> None:
            """Do nothing."""

        @pgq.entrypoint(PGQUEUER_WAKEUP)
        async def wakeup(job: Job) -> None:
            """Report when the handler started."""
            _wake_line((job.payload or b"").decode())

        managers.append(pgq)

    def stop() -> None:
        """Ask the worker(s) to stop."""
        for pgq in managers:
            pgq.shutdown.set()

    await _gate()
    _on_sigterm(stop)
    mode = QueueExecutionMode.drain if args.drain else QueueExecutionMode.continuous
    await asyncio.gather(
        *(
            pgq.run(
                batch_size=args.batch_size,
                mode=mode,
                max_concurrent_tasks=args.max_tasks or None,
            )
            for pgq in managers
        )
    )


def procrastinate_app(conninfo: str, *, pool_max_size: int = 10) -> Any:
    """Return a Procrastinate App on `conninfo` with the no-op and wake-up tasks."""
    import procrastinate

    app = procrastinate.App(
        connector=procrastinate.PsycopgConnector(
            conninfo=conninfo, min_size=1, max_size=pool_max_size
        )
    )

    @app.task(name=PROCRASTINATE_NOOP)
    async def noop() -> None:
        """Do nothing."""

    @app.task(name=PROCRASTINATE_WAKEUP)
    async def wakeup(payload: str) -> None:
        """Report when the handler started."""
        _wake_line(payload)

    return app


async def run_procrastinate(args: argparse.Namespace) -> None:
    """Run one Procrastinate worker with `--concurrency` concurrent jobs."""
    # A pooled connection per concurrent job, plus the fetch and the LISTEN.
    app = procrastinate_app(args.conninfo, pool_max_size=args.concurrency + 2)
    async with app.open_async():
        await _gate()
        work = asyncio.create_task(
            app.run_worker_async(
                concurrency=args.concurrency,
                wait=not args.drain,
                install_signal_handlers=False,
                listen_notify=True,
                delete_jobs="never",
            )
        )

        def stop() -> None:
            """Ask the worker(s) to stop."""
            work.cancel()

        _on_sigterm(stop)
        try:
            await work
        except asyncio.CancelledError:
            pass


RUNNERS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "pgbatch": run_pgbatch,
    "pgqueuer": run_pgqueuer,
    "procrastinate": run_procrastinate,
}


def main(argv: list[str] | None = None) -> None:
    """Parse the options and run the chosen system's worker."""
    parser = argparse.ArgumentParser(description="A peers.py worker process.")
    parser.add_argument("system", choices=sorted(RUNNERS))
    parser.add_argument("--conninfo", required=True)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--managers", type=int, default=1, help="PgQueuer: managers")
    parser.add_argument("--batch-size", type=int, default=10, help="PgQueuer: dequeue batch")
    parser.add_argument("--max-tasks", type=int, default=0, help="PgQueuer: 0 = unlimited")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    parser.add_argument("--drain", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    runner = RUNNERS[args.system](args)
    if args.uvloop:
        import uvloop

        uvloop.run(runner)
    else:
        asyncio.run(runner)


if __name__ == "__main__":
    main()
