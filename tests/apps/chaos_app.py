"""The app the worker-process tests run: tasks with controlled timing, failures and user rows.

Run it with `pgbatch worker --app tests.apps.chaos_app:app`. Every task writes one row
per item to `chaos_rows`, a table WITHOUT a primary key, so a shard committed twice
would show as duplicate rows; each row carries the lease epoch it was written under,
so a completion that slipped past the fence shows too. With CHAOS_RUN_LOG (a folder) set,
every run of a shard appends "shard_id epoch" to a file there before the handler works:
the claims made, which a deleted shard row (done, no failed item) no longer shows.
"""

from __future__ import annotations

import asyncio
import os
import random

import pgbatch

# Set to "1" in a worker's environment to make `fails_until_fixed` raise on every item.
FAILING_ENV = "CHAOS_FAILING"
# Per-shard handler time of `chaos`, drawn uniformly: long enough that kills and stalls
# land mid-shard, short enough that 1,000 shards finish in seconds on two cores.
CHAOS_SHARD_S = (0.05, 0.4)
# A re-run of a `chaos` shard (attempt 2 or later) takes this long: a frozen worker that
# wakes up then finds its lost shards still running under their new owner, and races it
# to complete them, which is the interleaving that lease fencing exists for.
CHAOS_RERUN_S = 1.5
# Per-shard handler time of `slow`: a shard is surely in flight when a test signals.
SLOW_SHARD_S = 1.5
# `hang_first` blocks this long on a shard's first attempt: "forever" for any test.
HANG_S = 3600.0
# Short leases so that a dead or frozen worker's shards come back within seconds.
TEST_LEASE_TTL_S = 2.0

TABLES_SQL = """
CREATE TABLE IF NOT EXISTS chaos_rows (
    batch_id    bigint NOT NULL,
    seq         bigint NOT NULL,
    shard_id    bigint NOT NULL,
    lease_epoch integer NOT NULL,
    attempt     integer NOT NULL,
    pid         integer NOT NULL
);
CREATE TABLE IF NOT EXISTS chaos_callbacks (
    batch_id     bigint NOT NULL,
    status       text   NOT NULL,
    items_ok     bigint NOT NULL,
    items_failed bigint NOT NULL,
    run_no       integer NOT NULL,
    pid          integer NOT NULL
);
"""


def _log_run(ctx: pgbatch.ShardContext) -> None:
    """Append this run's lease to the process's run log, one write (survives a SIGKILL)."""
    folder = os.environ.get("CHAOS_RUN_LOG")
    if not folder:
        return
    fd = os.open(f"{folder}/{os.getpid()}.runs", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{ctx.shard_id} {ctx.lease_epoch}\n".encode())
    finally:
        os.close(fd)


def _record(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
    pid = os.getpid()
    ctx.copy_rows(
        "chaos_rows",
        [(ctx.batch_id, i.seq, ctx.shard_id, ctx.lease_epoch, ctx.attempt, pid) for i in items],
        columns=("batch_id", "seq", "shard_id", "lease_epoch", "attempt", "pid"),
    )
    return [pgbatch.ok(i.value) for i in items]


def build_app(settings: pgbatch.Settings | None = None) -> pgbatch.App:
    """Return an App with the test tasks and callback registered."""
    app = pgbatch.App(settings=settings)

    @app.on_open
    async def create_tables(application: pgbatch.App) -> None:
        async with application.db.connection() as conn, conn.transaction():
            # Serialise the DDL: several workers start at once.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('chaos_app_tables'))")
            await conn.execute(TABLES_SQL)

    @app.task(shard_size=20, max_attempts=100, lease_ttl_s=TEST_LEASE_TTL_S)
    async def chaos(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        _log_run(ctx)
        await asyncio.sleep(CHAOS_RERUN_S if ctx.attempt > 1 else random.uniform(*CHAOS_SHARD_S))
        return _record(items, ctx)

    @app.task(shard_size=5, max_attempts=100, lease_ttl_s=TEST_LEASE_TTL_S)
    async def brief(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        # No sleep: the chaos test's small batches that retention prunes while it runs.
        return _record(items, ctx)

    @app.task(shard_size=5, lease_ttl_s=TEST_LEASE_TTL_S)
    async def slow(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        await asyncio.sleep(SLOW_SHARD_S)
        return _record(items, ctx)

    @app.task(shard_size=5, lease_ttl_s=TEST_LEASE_TTL_S)
    async def hang_first(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        if ctx.attempt == 1:
            await asyncio.sleep(HANG_S)
        return _record(items, ctx)

    @app.task(shard_size=10, max_attempts=2, lease_ttl_s=TEST_LEASE_TTL_S)
    async def fails_until_fixed(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        if os.environ.get(FAILING_ENV) == "1":
            raise RuntimeError("the handler is broken")
        return _record(items, ctx)

    @app.callback()
    async def record_done(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
        ctx.copy_rows(
            "chaos_callbacks",
            [
                (
                    batch.id,
                    str(ctx.batch_status),
                    batch.items_ok,
                    batch.items_failed,
                    ctx.run_no,
                    os.getpid(),
                )
            ],
            columns=("batch_id", "status", "items_ok", "items_failed", "run_no", "pid"),
        )

    return app


app = build_app()
