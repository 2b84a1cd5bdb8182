"""The completer: group-commits shard completions, isolating a completion that fails."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.database import RETRYABLE_ERRORS, Database
from pgbatch.db.shards import CompletionReport, ShardCompletion, complete_shards
from pgbatch.engine.group_commit import GroupCommitStats, GroupCommitter

__all__ = ["Completer", "CompletionOutcome"]

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CompletionOutcome:
    """What became of one shard's completion."""

    accepted: bool  # False: the lease was lost, nothing of it was written
    finished_batch: bool = False  # this completion's flush finished the shard's batch


class Completer:
    """Commit the completions of many shards, of many batches, in one transaction."""

    def __init__(self, db: Database, *, max_batch: int, max_delay_ms: float) -> None:
        self._db = db
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

    async def _commit(self, completions: Sequence[ShardCompletion]) -> CompletionReport:
        async def work(conn: psycopg.AsyncConnection[Any]) -> CompletionReport:
            return await complete_shards(conn, completions)

        return await self._db.run_in_transaction(work)

    async def _flush(
        self, completions: Sequence[ShardCompletion]
    ) -> Sequence[CompletionOutcome | BaseException]:
        try:
            return self._outcomes(completions, await self._commit(completions))
        except RETRYABLE_ERRORS:
            raise
        except psycopg.Error as exc:
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
        for c in completions:
            accepted = (c.shard_id, c.lease_epoch) in report.accepted
            outcomes.append(CompletionOutcome(accepted, accepted and c.batch_id in finished))
        return outcomes
