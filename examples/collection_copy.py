"""Copy a collection of companies into another one, deduplicated, as a pgbatch batch.

    .venv/bin/python examples/collection_copy.py [--associations 200000] [--concurrency 8]
        [--database-url URL]

It seeds the collection "example-source" with N associations, runs a worker in this
process, copies the source into "example-target" with live "x of n" progress, prints
how long it took and how many associations were inserted or already present, then copies
again: the second copy inserts nothing. Without DATABASE_URL it uses the embedded server.

Workers elsewhere can run the same task: `pgbatch worker --app examples.collection_copy:app`.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import pgbatch
from pgbatch.workloads import collections as copies

__all__ = ["SOURCE", "TARGET", "app", "main"]

SOURCE = "example-source"
TARGET = "example-target"
DEFAULT_ASSOCIATIONS = 200_000
WORKER_READY_TIMEOUT_S = 60.0

# The app `pgbatch worker --app examples.collection_copy:app` runs (DATABASE_URL, else embedded).
app = pgbatch.App()
copies.install(app)


async def copy_once(application: pgbatch.App, label: str) -> copies.CopyReport:
    """Copy SOURCE into TARGET, showing progress; print and return the report."""
    started = time.perf_counter()
    batch = await copies.submit_copy(application, source=SOURCE, target=TARGET, item_ids=None)
    async for snapshot in application.watch(batch.id, poll_interval_s=0.5):
        print(
            f"\r  {label}: {snapshot.items_done:,} of {snapshot.total_items:,} ranges",
            end="",
            flush=True,
        )
    elapsed = time.perf_counter() - started
    report = await copies.copy_report(application, batch.id)
    total = report.inserted + report.already_present
    print(
        f"\r  {label}: {report.ranges_done:,} of {report.ranges_total:,} ranges, "
        f"{total:,} associations in {elapsed:.2f} s ({total / elapsed:,.0f}/s): "
        f"{report.inserted:,} inserted, {report.already_present:,} already present"
    )
    return report


async def main(argv: list[str] | None = None) -> None:
    """Seed, copy, copy again, and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--associations", type=int, default=DEFAULT_ASSOCIATIONS)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args(argv)
    application = app
    if args.database_url:
        application = pgbatch.App(database_url=args.database_url)
        copies.install(application)
    async with application:
        for collection in (SOURCE, TARGET):
            await copies.delete_collection(application, collection)
            await copies.create_collection(application, collection)
        started = time.perf_counter()
        seeded = await copies.seed_items(application, SOURCE, args.associations)
        print(f"seeded {seeded:,} associations in {time.perf_counter() - started:.2f} s")
        worker = application.worker(concurrency=args.concurrency)
        running = asyncio.create_task(worker.run())
        try:
            # Timed from a worker that is up, as workers of a real deployment would be.
            await asyncio.wait_for(worker.listening.wait(), WORKER_READY_TIMEOUT_S)
            first = await copy_once(application, "copy")
            second = await copy_once(application, "copy again")
        finally:
            worker.request_stop()
            await running
    assert first.inserted == seeded and second.inserted == 0, (first, second)


if __name__ == "__main__":
    asyncio.run(main())
