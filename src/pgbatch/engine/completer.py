"""The completer: group-commits shard state changes (done, dead, cancelled, requeued)."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.database import Database
from pgbatch.db.sessions import is_transient
from pgbatch.db.shards import CompletionReport, ShardCompletion, complete_shards
from pgbatch.engine.group_commit import GroupCommitStats, GroupCommitter

__all__ = ["Completer", "CompletionOutcome"]

_log = logging.getLogger(__name__)

# Backoff between reruns of a flush that failed for a transient reason: full jitter from
# 50 ms doubling to 2 s, so a restarted server is retried within seconds without a
# stampede of every worker at the same instant.
TRANSIENT_RETRY_BASE_S = 0.05
TRANSIENT_RETRY_CAP_S = 2.0


@dataclass(frozen=True, slots=True)
class CompletionOutcome:
    """What became of one shard's completion."""

    accepted: bool  # False: the lease was lost, nothing of it was written (retries too)
    finished_batch: bool = False  # this completion's flush finished the shard's batch


class Completer:
    """Commit the completions of many shards, of many batches, in one transaction.

    A completion is any change of a running shard's state the worker makes: done, dead,
    cancelled, or a failed attempt sent back to the queue (`ShardCompletion.retry`); all
    share the fence, the flush, the isolation of a failing completion and the transient
    reruns.
    """

    def __init__(
        self,
        db: Database,
        *,
        max_batch: int,
        max_delay_ms: float,
        retry_max_s: float = 60.0,
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._db = db
        # A transient failure (invariant 7) is retried for up to retry_max_s; before each
        # rerun `before_retry` runs (the worker renews its leases: the flush held their
        # rows, so its heartbeats could not).
        self.retry_max_s = retry_max_s
        self._before_retry = before_retry
        self.transient_retries = 0
        self.committer: GroupCommitter[ShardCompletion, CompletionOutcome] = GroupCommitter(
            self._flush, max_batch=max_batch, max_delay_ms=max_delay_ms, name="completer"
        )
        self.isolated_flushes = 0

    @property
    def stats(self) -> GroupCommitStats:
        """Return the group-commit counters."""
        return self.committer.stats

    def start(self) -> None:
        """Start flushing."""
        self.committer.start()

    async def stop(self) -> None:
        """Flush what is queued and stop."""
        await self.committer.stop()

    async def complete(self, completion: ShardCompletion) -> CompletionOutcome:
        """Commit one shard's completion with others; raise if it alone cannot be written."""
        return await self.committer.submit(completion)

    def complete_nowait(
        self,
        completion: ShardCompletion,
        on_done: Callable[[CompletionOutcome | BaseException], None],
    ) -> bool:
        """Queue a completion whose outcome (or exception) goes to `on_done` after its flush.

        False when the queue is full or stopped: the caller awaits complete() instead, so
        backpressure is the same. One waiting task fewer per shard (docs/performance.md).
        """
        return self.committer.submit_nowait(completion, on_done)

    async def _commit(self, completions: Sequence[ShardCompletion]) -> CompletionReport:
        async def work(conn: psycopg.AsyncConnection[Any]) -> CompletionReport:
            return await complete_shards(conn, completions)

        deadline = time.monotonic() + self.retry_max_s
        attempt = 0
        while True:
            try:
                return await self._db.run_in_transaction(work)
            except psycopg.Error as exc:
                remaining = deadline - time.monotonic()
                if not is_transient(exc) or remaining <= 0:
                    raise
                attempt += 1
                self.transient_retries += 1
                # Safe to rerun even if the lost COMMIT did commit: the fence then matches
                # no row and the rerun reports those shards as not accepted.
                _log.warning(
                    "completion flush of %d shards failed (%s); retry %d", len(completions),
                    str(exc).strip() or type(exc).__name__, attempt,
                )  # fmt: skip
                ceiling = min(TRANSIENT_RETRY_CAP_S, TRANSIENT_RETRY_BASE_S * 2**attempt)
                await asyncio.sleep(min(remaining, random.uniform(0, ceiling)))
                if self._before_retry is not None:
                    await self._before_retry()

    async def _flush(
        self, completions: Sequence[ShardCompletion]
    ) -> Sequence[CompletionOutcome | BaseException]:
        try:
            return self._outcomes(completions, await self._commit(completions))
        except psycopg.Error as exc:
            if is_transient(exc):
                raise  # retried until retry_max_s: the database is away, every caller learns
            if len(completions) == 1:
                return [exc]
            # A completion's own rows broke the fast path (a constraint of the user's
            # table, say): commit each alone so one bad shard does not spoil the others.
            _log.warning("group completion failed (%s); isolating %d", exc, len(completions))
            self.isolated_flushes += 1
            results: list[CompletionOutcome | BaseException] = []
            for completion in completions:
                try:
                    report = await self._commit([completion])
                    results.extend(self._outcomes([completion], report))
                except psycopg.Error as single_exc:
                    results.append(single_exc)
            return results

    @staticmethod
    def _outcomes(
        completions: Sequence[ShardCompletion], report: CompletionReport
    ) -> list[CompletionOutcome | BaseException]:
        finished = set(report.finished_batches)
        outcomes: list[CompletionOutcome | BaseException] = []
        accepted_keys = report.accepted
        for c in completions:
            if (c.shard_id, c.lease_epoch) not in accepted_keys:
                outcomes.append(_FENCED_OUT)
            elif c.batch_id in finished:
                outcomes.append(_FINISHED)
            else:
                outcomes.append(_ACCEPTED)
        return outcomes


# The three outcomes there are, shared: they are frozen, and one per shard is measurable
# at one item per shard.
_FENCED_OUT = CompletionOutcome(False)
_ACCEPTED = CompletionOutcome(True)
_FINISHED = CompletionOutcome(True, True)
