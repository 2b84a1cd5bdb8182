"""A worker app that can freeze its own process inside a completion transaction.

With FREEZE_IN_FLUSH=1 in its environment, the worker SIGSTOPs itself once, in its first
completion flush that counted, right after the batch counters were updated and before
COMMIT: the row locks of that transaction (the batch's counter row among them) are held
by a process that no longer runs, as with a GC pause, a VM freeze or a half-open session.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Sequence
from typing import Any

import psycopg

import pgbatch
from pgbatch.db.shards import CompletionReport, ShardCompletion
from pgbatch.engine import completer as completer_module
from tests.apps.chaos_app import _record, build_app

FREEZE_ENV = "FREEZE_IN_FLUSH"
# Lease of `steady`: long against the session timeouts the test sets (lock 0.5 s, idle in
# transaction 1.5 s), so only the frozen worker's leases lapse.
STEADY_LEASE_TTL_S = 4.0
# Per-shard handler time: the batch outlasts the moment the frozen worker stops.
STEADY_SHARD_S = 0.2

app = build_app()


@app.task(shard_size=10, max_attempts=1, lease_ttl_s=STEADY_LEASE_TTL_S)
async def steady(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
    """Sleep a little, then record every item (one attempt only: no failure is tolerated)."""
    await asyncio.sleep(STEADY_SHARD_S)
    return _record(items, ctx)


_complete_shards = completer_module.complete_shards
_frozen = False


async def _complete_then_freeze(
    conn: psycopg.AsyncConnection[Any], completions: Sequence[ShardCompletion]
) -> CompletionReport:
    """Write the completions in the flush's transaction, then freeze before its COMMIT."""
    global _frozen
    report = await _complete_shards(conn, completions)
    if report.accepted and not _frozen:
        _frozen = True
        os.kill(os.getpid(), signal.SIGSTOP)
    return report


if os.environ.get(FREEZE_ENV) == "1":
    completer_module.complete_shards = _complete_then_freeze  # type: ignore[assignment]
