"""End to end at shard size 100 with the database's own counters: what a layout costs the server.

Run from the repository root:

    .venv/bin/python benchmarks/layout_e2e.py [--items N] [--database-url URL]

Two `pgbatch worker` processes (concurrency 32) and one batch of no-op items, timed from
the submit to the batch's end, in a database `pgbatch_layoutstats_<pid>` of its own.
Besides items/s it prints the database's counters over the run (pg_stat_database:
tuples returned and fetched, buffer hits and reads, commits): they count this database's
work alone, where the CPU of a shared server's processes counts everyone's. To compare
with another revision's engine in the same run, put its source first on the path (the
workers inherit it): `PYTHONPATH=/tmp/base/src .venv/bin/python benchmarks/layout_e2e.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.apps import NOOP_TASK, make_app
from benchmarks.harness import (
    WorkerProcesses,
    bench_database,
    connect,
    require_local,
    server_url,
)

COUNTERS = (
    "SELECT tup_returned, tup_fetched, blks_hit, blks_read, xact_commit"
    " FROM pg_stat_database WHERE datname = current_database()"
)
# The database's counters reach pg_stat_database when each backend reports them.
STATS_FLUSH_S = 0.7


async def run(url: str, items: int) -> None:
    """Run one batch end to end and print its rate and the database's counters."""
    async with bench_database(url, "pgbatch_layoutstats") as conninfo:
        app = make_app(conninfo)
        await app.open()
        try:
            async with WorkerProcesses(
                conninfo, app="benchmarks.apps:app", count=2, concurrency=32, label="layout"
            ):
                async with await connect(conninfo) as conn:
                    await conn.execute("SELECT pg_stat_reset()")
                started = time.time()
                batch = await app.submit(
                    NOOP_TASK, ({"n": n} for n in range(items)), shard_size=100
                )
                final = await app.wait(batch.id, timeout_s=600)
                seconds = time.time() - started
                await asyncio.sleep(STATS_FLUSH_S)
                async with await connect(conninfo) as conn:
                    row = await (await conn.execute(COUNTERS)).fetchone()
        finally:
            await app.close()
    assert row is not None and final.items_ok == items, (final, row)
    returned, fetched, hit, read, commits = row
    print(
        f"e2e {items / seconds:,.0f} items/s ({seconds:.2f} s); tuples returned {returned:,}, "
        f"fetched {fetched:,}; buffers hit {hit:,}, read {read:,}; commits {commits:,}"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    url = server_url(args.database_url)
    require_local(url)
    asyncio.run(run(url, args.items))


if __name__ == "__main__":
    main()
