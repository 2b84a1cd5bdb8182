"""Queries on shards: claim, heartbeat, rescue, release, and the fenced group flush of outcomes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import orjson
import psycopg
from psycopg.abc import QueryNoTemplate

from pgbatch.db.copy import (
    EncodedResults,
    EncodedRows,
    copy_encoded_rows,
    encode_outcomes,
    encode_results,
    encode_rows,
    storable_text,
)
from pgbatch.db.queries import query
from pgbatch.models import ClaimedShard, Item, Outcome, ShardStatus, TableRows

__all__ = [
    "ClaimCursor",
    "CommitStatement",
    "CompletionReport",
    "HeartbeatReport",
    "RescueReport",
    "ShardCompletion",
    "bury_shard",
    "claim_candidates",
    "claim_shard",
    "claim_shards",
    "complete_shards",
    "execute_statements",
    "heartbeat_shards",
    "release_shards",
    "rescue_expired_leases",
    "rescue_expired_shards",
]


@dataclass(frozen=True, slots=True)
class CommitStatement:
    """A statement a handler queued to run in its completion transaction, if that counts."""

    statement: QueryNoTemplate
    params: Mapping[str, Any] | Sequence[Any] | None = None


@dataclass(frozen=True, slots=True)
class ShardCompletion:
    """Everything one shard's state change commits, already encoded for COPY.

    `status` is where the shard goes: done, dead or cancelled with one result per item,
    or queued again after a failed attempt (`retry`: no results, `retry_delay_s`).
    Encoding happens when the completion is built, in the shard's own task: a value that
    cannot be stored fails that shard alone, and the completer's flush only sends bytes.
    """

    shard_id: int
    batch_id: int
    lease_epoch: int
    status: ShardStatus
    # Its outcomes as stored (a result block and the failed items' rows); None: none.
    results: EncodedResults | None
    items_ok: int
    items_failed: int
    writes: Sequence[EncodedRows] = ()
    error: str | None = None
    # Run after the COPYs, only if the fence accepted this completion.
    statements: Sequence[CommitStatement] = ()
    # A requeued shard is claimable again this long after the flush commits.
    retry_delay_s: float | None = None
    # The failure's traceback, kept with the shard's last error (bounded by the engine).
    traceback: str | None = None

    @classmethod
    def retry(
        cls,
        shard_id: int,
        batch_id: int,
        lease_epoch: int,
        *,
        delay_s: float,
        error: str,
        traceback: str | None = None,
    ) -> ShardCompletion:
        """Return the change that sends a failed attempt back to the queue after `delay_s`."""
        return cls(shard_id, batch_id, lease_epoch, ShardStatus.QUEUED, None, 0, 0, (),
                   _storable(error), (), delay_s, _storable(traceback))  # fmt: skip

    @classmethod
    def snooze(
        cls,
        shard_id: int,
        batch_id: int,
        lease_epoch: int,
        *,
        delay_s: float,
        reason: str,
        statements: Sequence[CommitStatement] = (),
    ) -> ShardCompletion:
        """Return the change that requeues a snoozed shard after `delay_s`, attempt refunded.

        The refund is one more statement of the fenced flush: it runs only if the shard
        was still this worker's, after the handler's own statements.
        """
        refund = CommitStatement(
            query("shard_snooze_refund"), {"shard_id": shard_id, "epoch": lease_epoch}
        )
        return cls(shard_id, batch_id, lease_epoch, ShardStatus.QUEUED, None, 0, 0, (),
                   _storable(reason), (*statements, refund), delay_s)  # fmt: skip

    @property
    def counts(self) -> bool:
        """Tell whether this change ends the shard, and so counts in its batch's progress."""
        return self.status is not ShardStatus.QUEUED

    @classmethod
    def build(
        cls,
        shard_id: int,
        batch_id: int,
        lease_epoch: int,
        status: ShardStatus,
        results: Sequence[tuple[int, Outcome]],
        writes: Sequence[TableRows] = (),
        error: str | None = None,
        statements: Sequence[CommitStatement] = (),
        *,
        traceback: str | None = None,
        traced: bool = False,
    ) -> ShardCompletion:
        """Encode results and user rows; raise TypeError if a value cannot be stored.

        `traced`: some outcomes carry a traceback (a failed attempt's), which their rows
        keep; otherwise failed items' rows name no traceback, as before.
        """
        items_ok = sum(1 for _, outcome in results if outcome.ok)
        return cls(
            shard_id,
            batch_id,
            lease_epoch,
            status,
            encode_results(batch_id, results, traced=traced),
            items_ok,
            len(results) - items_ok,
            [encode_rows(write) for write in writes],
            _storable(error),
            tuple(statements),
            None,
            _storable(traceback),
        )

    @classmethod
    def from_outcomes(
        cls,
        shard_id: int,
        batch_id: int,
        lease_epoch: int,
        status: ShardStatus,
        seqs: Sequence[int],
        outcomes: Sequence[Outcome],
        writes: Sequence[TableRows] = (),
        statements: Sequence[CommitStatement] = (),
    ) -> ShardCompletion:
        """Build as build() does from `zip(seqs, outcomes)`, without a step per ok item.

        The worker's path for a handler's own outcomes: the same bytes, the same errors.
        """
        results, items_ok = encode_outcomes(batch_id, seqs, outcomes)
        return cls(
            shard_id,
            batch_id,
            lease_epoch,
            status,
            results,
            items_ok,
            len(outcomes) - items_ok,
            [encode_rows(write) for write in writes],
            None,
            tuple(statements),
        )


def _storable(text: str | None) -> str | None:
    return None if text is None else storable_text(text)


@dataclass(slots=True)
class CompletionReport:
    """What one fenced group completion committed."""

    # (shard id, epoch) of the completions that counted
    accepted: set[tuple[int, int]] = field(default_factory=set)
    finished_batches: list[int] = field(default_factory=list)
    callbacks_inserted: list[int] = field(default_factory=list)


@dataclass(slots=True)
class ClaimCursor:
    """Where a claimer's round-robin over tenants resumes: the last tenant served, by queue.

    One per worker: each worker takes turns through the tenants on its own, so claims are
    fair whatever the number of workers, without a shared row to update on every claim.
    """

    after_tenant: dict[str, str] = field(default_factory=dict)

    def advance(self, queue: str, served: Sequence[ClaimedShard]) -> None:
        """Remember the tenant served last in this round, in the claim's rotation order."""
        if not served:
            return
        before = self.after_tenant.get(queue, "")
        tenants = sorted({shard.tenant for shard in served})
        after = [t for t in tenants if t > before]
        self.after_tenant[queue] = after[-1] if after else tenants[-1]


async def claim_shards(
    conn: psycopg.AsyncConnection[Any],
    *,
    worker_id: str,
    queues: Sequence[str],
    tasks: Sequence[str],
    limit: int,
    cursor: ClaimCursor | None = None,
    fair: bool = True,
    into: list[ClaimedShard] | None = None,
) -> list[ClaimedShard]:
    """Claim up to `limit` queued shards with their pending items, queues in the order given.

    Fair (the default): each queue is shared between its tenants round by round, resuming
    after the tenant `cursor` says was served last. `fair=False` is the priority-only
    claim, kept as the baseline of benchmarks/tenant_fairness.py. Each statement commits
    on its own: shards are appended to `into` as they are claimed, so a caller whose
    later statement fails still holds (and runs) the shards already claimed.
    """
    cursor = cursor if cursor is not None else ClaimCursor()
    shards: list[ClaimedShard] = into if into is not None else []
    for queue in queues:
        params = {"worker_id": worker_id, "queue": queue, "tasks": list(tasks)}
        got: list[ClaimedShard] = []
        if fair:
            after = cursor.after_tenant.get(queue, "")
            got = await _claim(
                conn, "shard_claim", {**params, "limit": limit - len(shards), "after_tenant": after}
            )
            cursor.advance(queue, got)
            shards.extend(got)
        if len(shards) < limit:
            # A short fair claim tops up in priority order: free slots never idle while
            # claimable work is queued (a tenant offered less than its share, or some of
            # its shards were locked by another claimer).
            shards.extend(
                await _claim(
                    conn, "shard_claim_by_priority", {**params, "limit": limit - len(shards)}
                )
            )
        if len(shards) >= limit:
            break
    return shards


async def claim_candidates(
    conn: psycopg.AsyncConnection[Any],
    *,
    queue: str,
    tasks: Sequence[str],
    limit: int,
    cursor: ClaimCursor | None = None,
) -> list[int]:
    """Return the ids of the shards a fair claim of `queue` would take, claiming nothing."""
    after = cursor.after_tenant.get(queue, "") if cursor is not None else ""
    cur = await conn.execute(
        query("shard_claim_candidates"),
        {"queue": queue, "tasks": list(tasks), "limit": limit, "after_tenant": after},
    )
    return [row[0] for row in await cur.fetchall()]


async def claim_shard(
    conn: psycopg.AsyncConnection[Any], *, worker_id: str, shard_id: int, tasks: Sequence[str]
) -> ClaimedShard | None:
    """Claim one named shard if it is still queued and claimable; None if it is not."""
    shards = await _claim(
        conn,
        "shard_claim_one",
        {"worker_id": worker_id, "shard_id": shard_id, "tasks": list(tasks)},
    )
    return shards[0] if shards else None


async def bury_shard(conn: psycopg.AsyncConnection[Any], shard_id: int, *, error: str) -> bool:
    """Mark a queued shard dead without reading its items, and count it once in its batch.

    For a shard no claim can read (issue 9). Every item without a result fails with
    `error`. Runs in the caller's transaction; False if the shard was no longer queued.
    """
    # The batch row first, as a cancel takes it (invariant 6): see shard_bury_lock_batch.
    await conn.execute(query("shard_bury_lock_batch"), {"shard_id": shard_id})
    row = await (
        await conn.execute(query("shard_bury"), {"shard_id": shard_id, "error": error})
    ).fetchone()
    if row is None:
        return False
    batch_id, items_failed = row
    # Through the completions' counter statement, so the transaction that makes
    # shards_done reach the total is the one that finishes the batch (invariant 3).
    await conn.execute(
        query("batch_add_progress"),
        {
            "batch_ids": [batch_id],
            "shards": [1],
            "dead": [1],
            "ok": [0],
            "failed": [items_failed],
            "cancelled": [0],
        },
    )
    await conn.execute(query("callback_notify"))
    return True


# The claim, heartbeat, rescue and completion statements are never prepared (issue 13).
# psycopg prepares a statement after five executions and PostgreSQL may then keep a generic
# plan until the table's statistics change; idle workers build it in the empty window
# after the pruner's VACUUM (0 pages, 0 rows), and kept while the next batch fills the
# table it read every queued shard per claim and seq-scanned shards per completed outcome
# (tests/integration/test_vacuum_plans.py, benchmarks/growth.py --auto-explain). A custom
# plan sees the table's current size; planning costs about 0.3-0.4 ms a statement.
_PREPARE_HOT_PATH = False


async def _claim(
    conn: psycopg.AsyncConnection[Any], name: str, params: Mapping[str, Any]
) -> list[ClaimedShard]:
    cur = await conn.execute(query(name), params, prepare=_PREPARE_HOT_PATH)
    shards = []
    for row in await cur.fetchall():
        shard_id, batch_id, task, epoch, attempts, max_attempts, ttl, cancelled = row[:8]
        first_seq, seqs, payloads = row[8:11]
        tenant, lease_refunds = row[12], row[13]
        values = orjson.loads(payloads) if payloads else []
        # A first run holds the whole block; a retried shard lists the seqs it reruns.
        if seqs is None:
            items = _items(range(first_seq, first_seq + len(values)), values)
        else:
            items = _items(seqs, [values[seq - first_seq] for seq in seqs])
        shards.append(
            ClaimedShard(
                id=shard_id,
                batch_id=batch_id,
                task=task,
                lease_epoch=epoch,
                attempts=attempts,
                max_attempts=max_attempts,
                lease_ttl_s=ttl,
                items=items,
                batch_cancelled=bool(cancelled),
                tenant=tenant,
                lease_refunds=lease_refunds,
            )
        )
    return shards


_new_tuple = tuple.__new__


def _items(seqs: Iterable[int], values: Iterable[Any]) -> tuple[Item, ...]:
    """Return Item(seq, value) pairs, built without a Python frame per item.

    Item(seq, value) runs the NamedTuple's generated __new__, a Python function: at 100
    items per shard that was the largest cost of a worker's claim (py-spy,
    docs/performance.md). tuple.__new__(Item, pair) over zip() builds the same Items in C.
    """
    return tuple(map(_new_tuple, repeat(Item), zip(seqs, values, strict=True)))


@dataclass(slots=True)
class HeartbeatReport:
    """What one heartbeat found about each lease it was asked to renew."""

    # renewed shard id → its batch was cancelled
    renewed: dict[int, bool] = field(default_factory=dict)
    # still held, but a row lock (this worker's own completion flush) kept it from renewal
    busy: set[int] = field(default_factory=set)
    # no longer running under that epoch: taken over, or already finished
    lost: set[int] = field(default_factory=set)


async def heartbeat_shards(
    conn: psycopg.AsyncConnection[Any], leases: Sequence[tuple[int, int]]
) -> HeartbeatReport:
    """Renew leases given as (shard id, epoch), never waiting on a locked row."""
    report = HeartbeatReport()
    if not leases:
        return report
    ordered = sorted(leases)
    cur = await conn.execute(
        query("shard_heartbeat_many"),
        {"ids": [s for s, _ in ordered], "epochs": [e for _, e in ordered]},
        prepare=_PREPARE_HOT_PATH,
    )
    for shard_id, state, cancelled in await cur.fetchall():
        if state == "renewed":
            report.renewed[shard_id] = bool(cancelled)
        elif state == "busy":
            report.busy.add(shard_id)
        else:
            report.lost.add(shard_id)
    return report


# How many times a shard's expired lease is refunded by default (Settings.lease_free_reruns).
DEFAULT_LEASE_FREE_RERUNS = 3


@dataclass(frozen=True, slots=True)
class RescueReport:
    """What one rescue of expired leases did."""

    rescued: int = 0
    refunded: int = 0  # of those, how many had their attempt refunded


async def rescue_expired_leases(
    conn: psycopg.AsyncConnection[Any],
    *,
    free_reruns: int = DEFAULT_LEASE_FREE_RERUNS,
    limit: int = 1000,
) -> RescueReport:
    """Requeue expired shards (refunding the attempt up to `free_reruns` times), wake workers."""
    async with conn.transaction():
        cur = await conn.execute(
            query("shard_rescue_expired"),
            {"limit": limit, "free_reruns": free_reruns},
            prepare=_PREPARE_HOT_PATH,
        )
        rows = await cur.fetchall()
        for queue in sorted({queue for queue, _ in rows}):
            await conn.execute(query("shard_notify_queue"), {"queue": queue})
    return RescueReport(len(rows), sum(1 for _, refunded in rows if refunded))


async def rescue_expired_shards(
    conn: psycopg.AsyncConnection[Any],
    *,
    free_reruns: int = DEFAULT_LEASE_FREE_RERUNS,
    limit: int = 1000,
) -> int:
    """Return expired shards to the queue and wake their workers; return how many."""
    report = await rescue_expired_leases(conn, free_reruns=free_reruns, limit=limit)
    return report.rescued


async def release_shards(
    conn: psycopg.AsyncConnection[Any], leases: Sequence[tuple[int, int]]
) -> int:
    """Give unfinished shards back to the queue at once (graceful drain); return how many."""
    if not leases:
        return 0
    ordered = sorted(leases)
    async with conn.transaction():
        cur = await conn.execute(
            query("shard_release"),
            {"ids": [s for s, _ in ordered], "epochs": [e for _, e in ordered]},
        )
        queues = {row[1] for row in await cur.fetchall()}
        for queue in sorted(queues):
            await conn.execute(query("shard_notify_queue"), {"queue": queue})
    return cur.rowcount


async def complete_shards(
    conn: psycopg.AsyncConnection[Any], completions: Sequence[ShardCompletion]
) -> CompletionReport:
    """Commit many shard state changes in the caller's transaction, fenced by epoch.

    Done, dead and cancelled shards and failed attempts sent back to the queue go through
    the same fenced statement. Shards whose lease was lost match no row and contribute
    nothing: not their results, not their user rows, not their statements, not their
    counts. The rest is written set-based: one COPY per table, the queued statements in
    one pipeline (shard id order, then queue order), and one counter update per batch
    that a finished shard counts in (a requeued shard counts in none).
    """
    report = CompletionReport()
    if not completions:
        return report
    # One completion per (shard, epoch): a duplicate would write its results twice.
    unique = {(c.shard_id, c.lease_epoch): c for c in reversed(completions)}
    ordered = sorted(unique.values(), key=lambda c: (c.shard_id, c.lease_epoch))
    # The statement's shape (each outcome probes its shard by primary key) keeps a plan
    # built on fresh statistics linear in the flush (tests/integration/test_complete_plan.py),
    # not one built for an empty table (2.6-5.4 s a flush): see _PREPARE_HOT_PATH.
    cur = await conn.execute(
        query("shard_complete_many"),
        {
            "ids": [c.shard_id for c in ordered],
            "epochs": [c.lease_epoch for c in ordered],
            "statuses": [str(c.status) for c in ordered],
            "errors": [c.error for c in ordered],
            "delays_s": [c.retry_delay_s for c in ordered],
            "tracebacks": [c.traceback for c in ordered],
            # A done shard without failed items is deleted, not updated: nothing reads it.
            "failed": [c.items_failed > 0 for c in ordered],
        },
        prepare=_PREPARE_HOT_PATH,
    )
    # A zombie and the shard's new holder may sit in the same flush: match on the epoch too.
    shard_rows = {(row[0], row[1]): row[2:] for row in await cur.fetchall()}
    report.accepted = set(shard_rows)
    accepted = [c for c in ordered if (c.shard_id, c.lease_epoch) in report.accepted]
    if not accepted:
        return report

    # A flush of retries only has no results. A first run's block goes in one COPY for
    # the flush; a retried shard's rerun (rare: a retry of its batch) merges into its block.
    with_results = [c for c in accepted if c.results is not None]
    merges = [c for c in with_results if shard_rows[(c.shard_id, c.lease_epoch)][0]]
    firsts = [c for c in with_results if not shard_rows[(c.shard_id, c.lease_epoch)][0]]
    for completion in merges:
        assert completion.results is not None
        _, first_seq, last_seq = shard_rows[(completion.shard_id, completion.lease_epoch)]
        await conn.execute(
            query("result_block_merge"),
            {
                "batch_id": completion.batch_id,
                "first_seq": first_seq,
                "last_seq": last_seq,
                "seqs": list(completion.results.seqs),
                "outputs": completion.results.outputs.decode(),
            },
        )
    if firsts:
        async with conn.cursor().copy(query("result_block_copy")) as copy:
            for completion in firsts:
                assert completion.results is not None
                await copy.write(completion.results.block_row(completion.batch_id))
    if any(c.results.errors for c in with_results if c.results is not None):
        await _write_errors(conn, with_results)

    await copy_encoded_rows(conn, [w for c in accepted for w in c.writes])
    # Before the counters: a long statement must not hold the hot batch row locked.
    statements = [s for c in accepted for s in c.statements]
    if statements:
        await execute_statements(conn, statements)

    totals: dict[int, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for completion in accepted:
        if not completion.counts:
            continue  # a requeued shard is not done: its batch's counters do not move
        entry = totals[completion.batch_id]
        entry[0] += 1
        entry[1] += completion.status is ShardStatus.DEAD
        entry[2] += completion.items_ok
        # A cancelled shard's items end as cancelled, not failed (issue 12 §3).
        cancelled = completion.status is ShardStatus.CANCELLED
        entry[3] += 0 if cancelled else completion.items_failed
        entry[4] += completion.items_failed if cancelled else 0
    batch_ids = sorted(totals)
    if not batch_ids:
        return report  # only retries: no batch row to lock
    cur = await conn.execute(
        query("batch_add_progress"),
        {
            "batch_ids": batch_ids,
            "shards": [totals[b][0] for b in batch_ids],
            "dead": [totals[b][1] for b in batch_ids],
            "ok": [totals[b][2] for b in batch_ids],
            "failed": [totals[b][3] for b in batch_ids],
            "cancelled": [totals[b][4] for b in batch_ids],
        },
    )
    for batch_id, finished, _status, callback_inserted, _ in await cur.fetchall():
        if finished:
            report.finished_batches.append(batch_id)
        if callback_inserted:
            report.callbacks_inserted.append(batch_id)
    if report.callbacks_inserted:
        await conn.execute(query("callback_notify"))
    return report


async def _write_errors(
    conn: psycopg.AsyncConnection[Any], completions: Sequence[ShardCompletion]
) -> None:
    """COPY the failed items' rows, and insert the traceback texts they name."""
    async with conn.cursor().copy(query("result_error_copy")) as copy:
        for completion in completions:
            if completion.results is not None and completion.results.errors:
                await copy.write(completion.results.errors)
    # One row per (batch, digest), in key order (invariant 6): concurrent flushes that
    # insert the same traceback wait on each other in one order, never in a cycle.
    texts = sorted(
        {
            (c.batch_id, d): t
            for c in completions
            if c.results is not None
            for d, t in c.results.tracebacks
        }.items()
    )
    if texts:
        await conn.execute(
            query("traceback_insert_many"),
            {
                "batch_ids": [batch_id for (batch_id, _), _ in texts],
                "digests": [digest for (_, digest), _ in texts],
                "texts": [text for _, text in texts],
            },
        )


async def execute_statements(
    conn: psycopg.AsyncConnection[Any], statements: Sequence[CommitStatement]
) -> None:
    """Run handler-queued statements in order, in the caller's transaction, one round trip."""
    if not statements:
        return
    if len(statements) == 1:
        await conn.execute(statements[0].statement, statements[0].params)
        return
    # Pipeline mode sends them all before reading any result: a flush of many shards
    # costs one round trip, not one per statement. The first error aborts the rest.
    async with conn.pipeline():
        for statement in statements:
            await conn.execute(statement.statement, statement.params)
