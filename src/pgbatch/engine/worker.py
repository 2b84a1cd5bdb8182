"""The worker: claims shards into free slots, runs handlers, heartbeats, drains on stop."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import importlib.metadata
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import psycopg

from pgbatch.config import Settings
from pgbatch.db.batches import get_batch
from pgbatch.db.callbacks import (
    ClaimedCallback,
    claim_callbacks,
    fail_callback,
    finish_callback,
    rescue_expired_callbacks,
)
from pgbatch.db.copy import copy_table_rows
from pgbatch.db.database import Database
from pgbatch.db.fleet import WorkerBeat, beat_worker, remove_worker
from pgbatch.db.retention import PruneHook, PruneReport
from pgbatch.db.sessions import is_transient
from pgbatch.db.shards import (
    ClaimCursor,
    ShardCompletion,
    bury_shard,
    claim_candidates,
    claim_shard,
    claim_shards,
    execute_statements,
    heartbeat_shards,
    release_shards,
    rescue_expired_leases,
)
from pgbatch.engine.completer import Completer, CompletionOutcome
from pgbatch.engine.context import CallbackContext, ShardContext
from pgbatch.engine.failures import RunFailed, describe, isolate, traceback_of
from pgbatch.engine.notifier import Notifier
from pgbatch.engine.pruner import prune_loop
from pgbatch.errors import NonRetryableError, Snooze
from pgbatch.models import BatchStatus, ClaimedShard, Item, Outcome, ShardStatus
from pgbatch.tasks import CallbackSpec, TaskSpec

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["Worker", "WorkerStats"]

_log = logging.getLogger(__name__)

# A heartbeat renews every lease at a third of the shortest TTL held, so two heartbeats
# can be lost before a lease lapses; idle, the loop still ticks this often.
HEARTBEAT_IDLE_S = 1.0
# Callbacks claimed per round; they are rare (one per batch).
CALLBACK_CLAIM_LIMIT = 4
# A claim never asks for more shards than this, whatever the free slots: it bounds the
# size of one claim statement's result (shards times items).
MAX_CLAIM_SHARDS = 256
# A worker holds at most this many shards per slot: running, or done and waiting for their
# completion to commit. The next claim still overlaps the previous commits (one slot's
# worth each), but a completer that falls behind stops the claims: with a claim of a few
# milliseconds (issue 13) the claim loop refilled every freed slot at once and thousands of
# shards per worker waited on the completer, their leases renewed by every heartbeat.
MAX_HELD_PER_SLOT = 2
# Errors of a claim that one shard's data can cause (the claim reads its items as one
# value): data exceptions (22), program limits such as "string buffer exceeds maximum
# allowed length" (54), internal errors and corruption (XX). Such a shard failing a claim
# on its own is dead; any other error leaves it queued (it is not the shard's fault).
SHARD_CLAIM_ERROR_CLASSES = ("22", "54", "XX")


def _installed_version() -> str:
    try:
        return importlib.metadata.version("pgbatch")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "unknown"


# What the registry shows as each worker's version (a fleet mid-upgrade shows two).
_PGBATCH_VERSION = _installed_version()


class _Phase(enum.Enum):
    RUNNING = "running"
    COMPLETING = "completing"


class _StopReason(enum.Enum):
    LOST = "lost"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"


@dataclass(slots=True)
class _Active:
    shard: ClaimedShard
    ctx: ShardContext
    task: asyncio.Task[None] | None = None
    phase: _Phase = _Phase.RUNNING
    stop_reason: _StopReason | None = None


@dataclass(slots=True)
class WorkerStats:
    """Counters of one worker, for logs, metrics and tests."""

    claims: int = 0
    # claim statements sent, whether or not they found work (a test waits on these)
    claim_rounds: int = 0
    # lease renewal rounds (a third of the shortest lease apart) and registry beats
    # (worker_beat_s apart): the one never hurries or delays the other
    lease_heartbeats: int = 0
    registry_beats: int = 0
    shards_claimed: int = 0
    shards_completed: int = 0
    shards_fenced_out: int = 0
    shards_retried: int = 0
    shards_dead: int = 0
    shards_released: int = 0
    shards_cancelled: int = 0
    # Shards whose handler raised pgbatch.Snooze: requeued for later, attempt not charged.
    shards_snoozed: int = 0
    # Shards no claim could read (issue 9), marked dead with the claim's error.
    shards_buried: int = 0
    leases_lost: int = 0
    # heartbeats that found a lease's row locked (its own completion flush) and skipped it
    leases_busy: int = 0
    # expired leases this worker requeued with the attempt refunded (invariant 7)
    lease_refunds: int = 0
    # completion flushes rerun after a transient failure (lost connection, lock timeout)
    completion_retries: int = 0
    # Handler calls made to bisect failed shards, and the poison items they found.
    isolation_runs: int = 0
    poison_items: int = 0
    callbacks_run: int = 0
    callbacks_failed: int = 0
    rescued: int = 0
    # finished batches this worker's pruning passes removed (retention)
    batches_pruned: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def summary(self) -> str:
        """Return what the worker did, in one line a person reads (zero counts left out)."""
        ran_s = time.monotonic() - self.started_at
        done = f"{_count(self.shards_completed, 'shard')} completed in {ran_s:.1f} s"
        extras = [
            (self.shards_retried, "retried"),
            (self.shards_dead, "dead (out of attempts)"),
            (self.shards_cancelled, "cancelled"),
            (self.shards_released, "released unfinished (back in the queue)"),
            (self.shards_fenced_out, "discarded (lease taken over)"),
            (self.rescued, "expired leases requeued"),
            (self.callbacks_run, "callbacks run"),
            (self.callbacks_failed, "callbacks failed"),
        ]
        return "; ".join([done, *(f"{n} {what}" for n, what in extras if n)])


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


class Worker:
    """Run the app's tasks with `concurrency` handler slots until asked to stop."""

    def __init__(
        self,
        app: App,
        *,
        concurrency: int = 32,
        queues: Sequence[str] | None = None,
        worker_id: str | None = None,
        drain_timeout_s: float = 30.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.app = app
        self.settings: Settings = app.settings
        self.concurrency = concurrency
        self.queues = list(queues) if queues else sorted({t.queue for t in app.tasks.values()})
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.drain_timeout_s = drain_timeout_s
        self.stats = WorkerStats()
        self._active: dict[int, _Active] = {}
        self._wake = asyncio.Event()
        self._callback_wake = asyncio.Event()
        self._slot_freed = asyncio.Event()
        self._lease_added = asyncio.Event()
        self._handlers_running = 0
        # Completions handed to the completer whose outcome is not recorded yet.
        self._handed_over = 0
        self._handovers_settled = asyncio.Event()
        self._stopping = asyncio.Event()
        # Set while the claim loop waits because its last claim found the queue empty (a
        # state, not a pulse: a test waiting for it cannot miss it).
        self.queue_empty = asyncio.Event()
        self.listening = asyncio.Event()  # test signal: the LISTEN connection is up
        self._completer: Completer | None = None
        self._notifier: Notifier | None = None
        self._db: Database | None = None
        self._claim_cursor = ClaimCursor()
        # The heartbeat's own connection: a lease renewal never waits for a pooled
        # connection held by a flush stuck behind a lock. One round at a time.
        self._heartbeat_conn: psycopg.AsyncConnection[Any] | None = None
        self._heartbeat_lock = asyncio.Lock()
        # The registry row (pgbatch.workers) is refreshed by the heartbeat loop at most
        # once per worker_beat_s: one upsert per interval, never one per shard.
        self._next_beat = 0.0
        # When the leases' next heartbeat is due (monotonic), None between two rounds.
        self._lease_deadline: float | None = None
        self.registered = asyncio.Event()  # test signal: the registry row is written

    # -- lifecycle -------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop claiming; in-flight shards finish (or are released after the drain timeout)."""
        self._stopping.set()

    def completion_flush_sizes(self) -> dict[int, int]:
        """Return how many completion flushes had each size (shards), for metrics."""
        return dict(self._completer.stats.flush_sizes) if self._completer else {}

    async def run(self) -> None:
        """Work until request_stop() is called, then drain and return."""
        if not self.app.tasks:
            raise ValueError("the app has no tasks registered; nothing to work on")
        await self.app.open()
        self._db = db = self.app.db
        self._completer = Completer(
            db,
            max_batch=self.settings.completer_max_batch,
            max_delay_ms=self.settings.completer_max_delay_ms,
            retry_max_s=self.settings.completer_retry_max_s,
            before_retry=self._renew_before_flush_retry,
        )
        self._completer.start()
        self._notifier = Notifier(
            db,
            ["pgbatch_shards", "pgbatch_callbacks"],
            self._on_notify,
            on_connect=self._on_listen_connect,
            listening=self.listening,
        )
        self._notifier.start()
        helpers = [
            asyncio.create_task(self._heartbeat_loop(), name="pgbatch-heartbeat"),
            asyncio.create_task(self._rescue_loop(), name="pgbatch-rescue"),
            asyncio.create_task(self._callback_loop(), name="pgbatch-callbacks"),
            asyncio.create_task(
                prune_loop(db, self.settings, self._prune_hooks(), self._on_prune_report),
                name="pgbatch-prune",
            ),
        ]
        _log.info(
            "worker %s started: %d slots, queues %s", self.worker_id, self.concurrency, self.queues
        )
        self._warn_about_short_leases()
        try:
            await self._beat_registry()
            await self._claim_loop()
            await self._drain()
        finally:
            await self._notifier.stop()
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await helper
            await self._completer.stop()
            await self._leave_registry()
            await self._close_heartbeat_conn()
            _log.info("worker %s stopped: %s", self.worker_id, self.stats.summary())

    async def _drain(self) -> None:
        tasks = [a.task for a in self._active.values() if a.task is not None]
        if tasks:
            _log.info(
                "draining %d in-flight shards (up to %.0f s)", len(tasks), self.drain_timeout_s
            )
            await asyncio.wait(tasks, timeout=self.drain_timeout_s)
        leftovers = [a for a in self._active.values() if a.phase is _Phase.RUNNING]
        for active in leftovers:
            self._stop_shard(active, _StopReason.SHUTDOWN)
        remaining = [a.task for a in self._active.values() if a.task is not None]
        if remaining:
            await asyncio.wait(remaining)
        # Completions handed to the completer are written before it stops; wait until
        # their outcomes are recorded too (and any rerun of a failed one has ended).
        while self._handed_over:
            self._handovers_settled.clear()
            await self._handovers_settled.wait()
        if leftovers:
            assert self._db is not None
            async with self._db.connection() as conn:
                released = await release_shards(
                    conn, [(a.shard.id, a.shard.lease_epoch) for a in leftovers]
                )
            self.stats.shards_released += released
            _log.info("released %d unfinished shards", released)

    # -- claiming --------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        assert self._db is not None
        tasks = sorted(self.app.tasks)
        while not self._stopping.is_set():
            free = min(
                self.concurrency - self._handlers_running,
                MAX_HELD_PER_SLOT * self.concurrency - len(self._active),
            )
            if free <= 0:
                self._slot_freed.clear()
                await self._wait_any(self._slot_freed, timeout=None)
                continue
            self._wake.clear()
            limit = min(free, MAX_CLAIM_SHARDS)
            try:
                async with self._db.connection() as conn:
                    shards = await self._claim(conn, tasks, limit)
                self.stats.claim_rounds += 1
            except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
                _log.warning("claim failed (%s); retrying after the poll interval", exc)
                await self._wait_any(self._wake, timeout=self.settings.poll_interval_s)
                continue
            if shards:
                self.stats.claims += 1
                self.stats.shards_claimed += len(shards)
                for shard in shards:
                    self._start_shard(shard)
                self.queue_empty.clear()
            else:
                self.queue_empty.set()
            if len(shards) < limit:
                await self._wait_any(self._wake, timeout=self.settings.poll_interval_s)

    async def _claim(
        self, conn: psycopg.AsyncConnection[Any], tasks: list[str], limit: int
    ) -> list[ClaimedShard]:
        """Claim up to `limit` shards; if the claim fails, isolate the shard that broke it.

        A shard whose items the database cannot read (issue 9: a value past PostgreSQL's
        1 GB) fails every claim that takes it, which wedged the queue for every tenant.
        A failed claim that is not a lost connection falls back to one shard at a time.
        """
        # Shards claimed before a statement failed are committed: keep and run them.
        shards: list[ClaimedShard] = []
        try:
            return await claim_shards(
                conn,
                worker_id=self.worker_id,
                queues=self.queues,
                tasks=tasks,
                limit=limit,
                cursor=self._claim_cursor,
                into=shards,
            )
        except psycopg.Error as exc:
            # A lost connection, a lock or statement timeout: nothing is wrong with a
            # shard's data, so the claim loop waits and claims again as a whole.
            if _is_connection_loss(conn, exc) or is_transient(exc):
                raise
            _log.warning("claim failed (%s); claiming one shard at a time", exc)
        try:
            await self._claim_one_by_one(conn, tasks, limit, shards)
        except psycopg.Error as exc:
            if _is_connection_loss(conn, exc):
                raise
            # The fallback itself failed: keep what it claimed, try again next round.
            _log.warning("claiming one shard at a time failed: %s", exc)
        return shards

    async def _claim_one_by_one(
        self,
        conn: psycopg.AsyncConnection[Any],
        tasks: list[str],
        limit: int,
        shards: list[ClaimedShard],
    ) -> None:
        """Claim the shards a claim would take one at a time; bury those that fail alone."""
        for queue in self.queues:
            if len(shards) >= limit:
                break
            candidates = await claim_candidates(
                conn, queue=queue, tasks=tasks, limit=limit - len(shards), cursor=self._claim_cursor
            )
            for shard_id in candidates:
                try:
                    shard = await claim_shard(
                        conn, worker_id=self.worker_id, shard_id=shard_id, tasks=tasks
                    )
                except psycopg.Error as exc:
                    if _is_connection_loss(conn, exc):
                        raise
                    await self._bury(conn, shard_id, exc)
                    continue
                if shard is not None:
                    shards.append(shard)

    async def _bury(
        self, conn: psycopg.AsyncConnection[Any], shard_id: int, exc: psycopg.Error
    ) -> None:
        """Mark dead a shard that fails a claim on its own, if the error can be its data's."""
        if not (exc.sqlstate or "").startswith(SHARD_CLAIM_ERROR_CLASSES):
            # Not the shard's fault (a resource limit, a timeout): it stays queued; the
            # other shards were still claimed, so the queue moves on.
            _log.warning("shard %d: claim failed (%s); left queued", shard_id, exc)
            return
        message = f"cannot be claimed: {type(exc).__name__}: {exc}"[:2000]
        async with conn.transaction():
            buried = await bury_shard(conn, shard_id, error=message)
        if buried:
            self.stats.shards_buried += 1
            self.stats.shards_dead += 1
            _log.error("shard %d is dead: it %s", shard_id, message)

    async def _wait_any(self, event: asyncio.Event, *, timeout: float | None) -> None:
        waiters = {
            asyncio.ensure_future(event.wait()),
            asyncio.ensure_future(self._stopping.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _start_shard(self, shard: ClaimedShard) -> None:
        ctx = ShardContext(
            batch_id=shard.batch_id,
            shard_id=shard.id,
            attempt=shard.attempts,
            lease_epoch=shard.lease_epoch,
            task=shard.task,
        )
        active = _Active(shard, ctx)
        self._active[shard.id] = active
        self._handlers_running += 1
        active.task = asyncio.create_task(self._process(active), name=f"pgbatch-shard-{shard.id}")
        self._lease_added.set()

    def _to_completing(self, active: _Active) -> None:
        if active.phase is _Phase.RUNNING:
            active.phase = _Phase.COMPLETING
            self._handlers_running -= 1
            self._slot_freed.set()

    def _stop_shard(self, active: _Active, reason: _StopReason) -> None:
        if active.phase is _Phase.RUNNING and active.stop_reason is None and active.task:
            active.stop_reason = reason
            active.task.cancel()

    # -- running one shard -----------------------------------------------------------------

    async def _process(self, active: _Active) -> None:
        shard = active.shard
        handed_over = False
        try:
            completion = await self._execute(active)
            # The slot is free once the handler is done: the next claim overlaps this
            # shard's commit, as far as MAX_HELD_PER_SLOT lets claims run ahead of commits.
            self._to_completing(active)
            if completion is not None:
                # The common case: the completer takes it without waiting, and this task
                # ends; _on_completed records the outcome in the flusher after the commit.
                assert self._completer is not None
                on_done = functools.partial(self._on_completed, active, completion)
                handed_over = self._completer.complete_nowait(completion, on_done)
                if handed_over:
                    self._handed_over += 1
                else:  # the completer's queue is full: wait for room, as before
                    await self._complete(active, completion)
        except Exception:
            # A bug or a lost database: the lease lapses and another worker retries.
            _log.exception("shard %d: unexpected error; its lease will expire", shard.id)
        finally:
            self._to_completing(active)
            if not handed_over:
                self._active.pop(shard.id, None)
                self._slot_freed.set()  # a held shard less: the claim loop may be waiting on it

    async def _complete(self, active: _Active, completion: ShardCompletion) -> None:
        assert self._completer is not None
        try:
            outcome = await self._completer.complete(completion)
        except psycopg.Error as exc:
            retried = await self._complete_after_error(active, completion, exc)
            if retried is None:
                return
            completion, outcome = retried
        self._record(completion, outcome)

    async def _complete_after_error(
        self, active: _Active, completion: ShardCompletion, exc: psycopg.Error
    ) -> tuple[ShardCompletion, CompletionOutcome] | None:
        """Handle a completion the completer could not write; None if nothing more is done."""
        assert self._completer is not None
        if is_transient(exc):
            # The database was away longer than completer_retry_max_s: not the
            # handler's failure. The lease lapses and the rerun is refunded.
            _log.warning("shard %d: completion not written (%s)", completion.shard_id, exc)
            return None
        # Its results or rows could not be written even alone (a constraint of the
        # user's table, say): that is a failed attempt of the shard.
        if completion.status is not ShardStatus.DONE:
            raise exc
        failed = self._fail(active, f"completion failed: {exc}")
        return failed, await self._completer.complete(failed)

    def _on_completed(
        self,
        active: _Active,
        completion: ShardCompletion,
        result: CompletionOutcome | BaseException,
    ) -> None:
        """Record a handed-over completion's outcome (called by the completer's flusher)."""
        if isinstance(result, BaseException):
            # Rare (a shard's own rows broke its write, or the database stayed away): the
            # same handling as an awaited completion's, in a task of its own.
            active.task = asyncio.create_task(
                self._after_failed_handover(active, completion, result),
                name=f"pgbatch-shard-{active.shard.id}-completion",
            )
            return
        self._record(completion, result)
        self._settle_handover(active)

    async def _after_failed_handover(
        self, active: _Active, completion: ShardCompletion, exc: BaseException
    ) -> None:
        try:
            if not isinstance(exc, psycopg.Error):
                raise exc
            retried = await self._complete_after_error(active, completion, exc)
            if retried is not None:
                self._record(*retried)
        except Exception:
            _log.exception("shard %d: unexpected error; its lease will expire", completion.shard_id)
        finally:
            self._settle_handover(active)

    def _settle_handover(self, active: _Active) -> None:
        self._active.pop(active.shard.id, None)
        self._slot_freed.set()  # a held shard less: the claim loop may be waiting on it
        self._handed_over -= 1
        if not self._handed_over:
            self._handovers_settled.set()

    def _record(self, completion: ShardCompletion, outcome: CompletionOutcome) -> None:
        if not outcome.accepted:
            self.stats.shards_fenced_out += 1
            _log.info("shard %d: lease lost before completion, discarded", completion.shard_id)
        elif completion.status is ShardStatus.QUEUED:
            self.stats.shards_retried += 1
        elif completion.status is ShardStatus.DEAD:
            self.stats.shards_dead += 1
        elif completion.status is ShardStatus.CANCELLED:
            self.stats.shards_cancelled += 1
        else:
            self.stats.shards_completed += 1

    async def _execute(self, active: _Active) -> ShardCompletion | None:
        shard = active.shard
        if shard.batch_cancelled:
            # A rescued shard of a cancelled batch: end it without running the handler.
            return self._terminal(shard, ShardStatus.CANCELLED, "cancelled")
        if shard.counted_attempts > shard.max_attempts:
            # Claimed again after its last attempt's lease expired (the worker died) and
            # the free reruns of expired leases are used up.
            return self._terminal(
                shard,
                ShardStatus.DEAD,
                f"gave up after {shard.max_attempts} attempts: lease expired",
            )
        if not shard.items:
            return ShardCompletion.build(
                shard.id, shard.batch_id, shard.lease_epoch, ShardStatus.DONE, ()
            )
        spec: TaskSpec = self.app.tasks[shard.task]
        try:
            return await self._run_shard(active, spec)
        except asyncio.CancelledError:
            # Also while isolating poison items: nothing of the isolation is kept.
            reason = active.stop_reason
            if reason is None:
                raise
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            if reason is _StopReason.CANCELLED:
                return self._terminal(shard, ShardStatus.CANCELLED, "cancelled")
            return None  # lost: someone else owns it; shutdown: released by _drain

    async def _run_shard(self, active: _Active, spec: TaskSpec) -> ShardCompletion:
        shard, ctx = active.shard, active.ctx
        failure: Exception | None = None
        try:
            call = spec.fn(list(shard.items), ctx)
            if spec.timeout_s is not None:
                try:
                    outcomes = await asyncio.wait_for(call, spec.timeout_s)
                except TimeoutError:
                    return self._fail(active, f"handler timed out after {spec.timeout_s} s")
            else:
                outcomes = await call
        except Snooze as snooze:
            self.stats.shards_snoozed += 1
            return ShardCompletion.snooze(
                shard.id, shard.batch_id, shard.lease_epoch, delay_s=snooze.seconds,
                reason=str(snooze)[:2000], statements=ctx.statements,
            )  # fmt: skip
        except Exception as exc:
            failure = exc
        if failure is not None:
            # Outside the except block: the isolation's own failures must not chain this
            # one into their tracebacks as "during handling of the above exception".
            retry = not isinstance(failure, NonRetryableError)
            return await self._after_raise(active, spec, failure, retry=retry)
        problem = _check_outcomes(outcomes, len(shard.items))
        if problem:
            return self._fail(active, problem)
        try:
            return ShardCompletion.from_outcomes(
                shard.id,
                shard.batch_id,
                shard.lease_epoch,
                ShardStatus.DONE,
                tuple(map(_seq_of, shard.items)),
                outcomes,
                ctx.writes,
                ctx.statements,
            )
        except (TypeError, ValueError) as exc:
            # An output or a row that cannot be stored fails this shard, not its neighbours.
            return self._fail(active, f"cannot store the handler's output: {exc}")

    async def _after_raise(
        self, active: _Active, spec: TaskSpec, exc: Exception, *, retry: bool
    ) -> ShardCompletion:
        """Decide what a raising handler's shard becomes: requeued, isolated, or dead.

        With attempts left and an ordinary exception, the whole shard is retried as
        before. Otherwise (NonRetryableError, or the last attempt) a shard of several
        items is searched for its poison items (engine/failures.py), unless the task
        opted out: the others succeed in this attempt's one fenced completion.
        """
        shard = active.shard
        message, trace = describe(exc), traceback_of(exc)
        last = not retry or shard.counted_attempts >= shard.max_attempts
        if not (last and spec.isolate_poison != "off" and len(shard.items) > 1):
            return self._fail(active, message, retry=retry, traceback=trace)
        try:
            found = await isolate(
                shard.items,
                active.ctx,
                lambda items, ctx: _run_part(spec, items, ctx),
                failure=exc,
                strategy=spec.isolate_poison,
            )
        except Snooze as snooze:
            # A part asked to wait (a spent rate limit): the shard waits whole, and no
            # write of the failed run or of the isolation is kept.
            self.stats.shards_snoozed += 1
            return ShardCompletion.snooze(
                shard.id, shard.batch_id, shard.lease_epoch, delay_s=snooze.seconds,
                reason=str(snooze)[:2000],
            )  # fmt: skip
        self.stats.isolation_runs += found.runs
        if found.retryable is not None and shard.counted_attempts < shard.max_attempts:
            # An item failed with an ordinary exception and attempts remain: that may be
            # transient, so the shard is retried whole, as it would have been.
            return self._fail(
                active, describe(found.retryable), traceback=traceback_of(found.retryable)
            )
        self.stats.poison_items += found.poison
        where = f"attempt {shard.attempts}" if not retry else f"{shard.attempts} attempts"
        # Each poison item keeps its own error, said as a dead shard's items say theirs.
        prefix = (
            f"not retried (attempt {shard.attempts})"
            if not retry
            else (f"failed after {shard.attempts} attempts")
        )
        poison = found.poison_seqs
        found.outcomes = [
            (seq, o._replace(error=f"{prefix}: {o.error}"[:2000]) if seq in poison else o)
            for seq, o in found.outcomes
        ]
        if not found.items_ok:
            summary = f"every item failed alone ({where}): {message}"
            _log.warning("shard %d dead: %s", shard.id, summary)
            status = ShardStatus.DEAD
        else:
            summary = (
                f"{found.poison} of {len(shard.items)} items failed alone, the others "
                f"succeeded ({where}): {message}"
            )
            _log.warning("shard %d: %s", shard.id, summary)
            status = ShardStatus.DONE
        try:
            return ShardCompletion.build(
                shard.id,
                shard.batch_id,
                shard.lease_epoch,
                status,
                found.outcomes,
                found.writes,
                summary[:2000],
                found.statements,
                traceback=trace,
                traced=True,
            )
        except (TypeError, ValueError) as store_exc:
            return self._fail(active, f"cannot store the handler's output: {store_exc}")

    def _terminal(
        self,
        shard: ClaimedShard,
        status: ShardStatus,
        message: str,
        *,
        traceback: str | None = None,
    ) -> ShardCompletion:
        failure = Outcome(False, None, message, traceback)
        return ShardCompletion.build(
            shard.id,
            shard.batch_id,
            shard.lease_epoch,
            status,
            [(item.seq, failure) for item in shard.items],
            error=message,
            traceback=traceback,
            traced=traceback is not None,
        )

    def _fail(
        self,
        active: _Active,
        message: str,
        *,
        retry: bool = True,
        traceback: str | None = None,
    ) -> ShardCompletion:
        """Return the change a failed attempt makes: back to the queue, or dead if it was the last.

        Either goes through the completer like a completion, fenced by the epoch and
        group-committed with its neighbours, after the handler's slot is freed. Without
        `retry` (the handler raised NonRetryableError) the shard is dead at once.
        """
        shard = active.shard
        if not retry:
            _log.warning("shard %d dead, not retried: %s", shard.id, message)
            return self._terminal(
                shard,
                ShardStatus.DEAD,
                f"not retried (attempt {shard.attempts}): {message}",
                traceback=traceback,
            )
        if shard.counted_attempts >= shard.max_attempts:
            _log.warning("shard %d dead after %d attempts: %s", shard.id, shard.attempts, message)
            return self._terminal(
                shard,
                ShardStatus.DEAD,
                f"failed after {shard.attempts} attempts: {message}",
                traceback=traceback,
            )
        delay = self._backoff_s(shard.attempts)
        _log.info(
            "shard %d attempt %d failed (%s); retry in %.1f s",
            shard.id,
            shard.attempts,
            message,
            delay,
        )
        return ShardCompletion.retry(
            shard.id,
            shard.batch_id,
            shard.lease_epoch,
            delay_s=delay,
            error=message[:2000],
            traceback=traceback,
        )

    def _backoff_s(self, attempt: int) -> float:
        ceiling: float = min(
            self.settings.retry_backoff_max_s,
            self.settings.retry_backoff_base_s * 2.0 ** (attempt - 1),
        )
        # "Equal jitter": at least half the backoff, so retries cannot stampede at zero.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    # -- leases ----------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            if await self._sleep_until_heartbeat_due():
                await self._heartbeat_once()
            if time.monotonic() >= self._next_beat:
                await self._beat_registry()

    async def _beat_registry(self) -> None:
        """Write this worker's registry row: queues, tasks, slots in use, heartbeat time."""
        beat = WorkerBeat(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            tasks=sorted(self.app.tasks),
            concurrency=self.concurrency,
            slots_in_use=self._handlers_running,
            version=_PGBATCH_VERSION,
            ttl_s=self.settings.worker_ttl_s,
            gc_after_s=self.settings.worker_gc_after_s,
        )
        # Due again one interval from now, even if this beat fails: no tight retry loop.
        self._next_beat = time.monotonic() + self.settings.worker_beat_s
        async with self._heartbeat_lock:
            try:
                async with asyncio.timeout(max(self.settings.worker_beat_s, 0.5)):
                    conn = await self._heartbeat_connection()
                    await beat_worker(conn, beat)
                self.stats.registry_beats += 1
            except (psycopg.Error, TimeoutError) as exc:
                # The registry is for people reading it: a failed beat costs nothing else.
                _log.warning("registry heartbeat failed: %s", str(exc) or type(exc).__name__)
                await self._close_heartbeat_conn()
                return
        self.registered.set()

    async def _leave_registry(self) -> None:
        """Delete this worker's registry row: it stopped cleanly, so it is not "expired"."""
        if not self.registered.is_set():
            return
        assert self._db is not None
        try:
            # A pooled connection: the heartbeat's may have been cut mid-statement when
            # its loop was cancelled.
            async with asyncio.timeout(HEARTBEAT_IDLE_S * 5), self._db.connection() as conn:
                await remove_worker(conn, self.worker_id)
        except (psycopg.Error, TimeoutError) as exc:
            _log.warning("could not leave the worker registry (it expires): %s", exc)

    async def _heartbeat_once(self) -> None:
        """Renew every lease held, on the heartbeat's own connection; stop lost shards."""
        async with self._heartbeat_lock:
            held = list(self._active.values())
            if not held:
                return
            try:
                # A half-open connection must not stall renewals: a round that takes a
                # whole interval is abandoned and the connection replaced.
                async with asyncio.timeout(max(self._heartbeat_interval_s(), 0.5)):
                    conn = await self._heartbeat_connection()
                    report = await heartbeat_shards(
                        conn, [(a.shard.id, a.shard.lease_epoch) for a in held]
                    )
                self.stats.lease_heartbeats += 1
            except (psycopg.Error, TimeoutError) as exc:
                _log.warning("heartbeat failed: %s", str(exc) or type(exc).__name__)
                await self._close_heartbeat_conn()
                return
        self.stats.leases_busy += len(report.busy)
        for active in held:
            shard_id = active.shard.id
            if shard_id in report.lost:
                if active.phase is _Phase.RUNNING and self._active.get(shard_id):
                    self.stats.leases_lost += 1
                    active.ctx.mark_lost()
                    self._stop_shard(active, _StopReason.LOST)
            elif report.renewed.get(shard_id):
                active.ctx.mark_cancelled()
                self._stop_shard(active, _StopReason.CANCELLED)

    async def _heartbeat_connection(self) -> psycopg.AsyncConnection[Any]:
        if self._heartbeat_conn is None or self._heartbeat_conn.closed:
            assert self._db is not None
            self._heartbeat_conn = await self._db.connect_dedicated()
        return self._heartbeat_conn

    async def _close_heartbeat_conn(self) -> None:
        conn, self._heartbeat_conn = self._heartbeat_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _renew_before_flush_retry(self) -> None:
        # The failed flush held its shards' rows, so heartbeats found them busy; renew
        # now, while the rows are free, or the leases lapse during a long outage.
        self.stats.completion_retries += 1
        await self._heartbeat_once()

    def _warn_about_short_leases(self) -> None:
        # A lease shorter than the session timeouts lapses while a flush still waits on a
        # frozen session's lock (invariant 7): the shards rerun, refunded, but rerun.
        bound_ms = max(
            self.settings.session_lock_timeout_ms,
            self.settings.session_idle_in_transaction_timeout_ms,
        )
        for spec in self.app.tasks.values():
            if spec.lease_ttl_s * 1000 <= bound_ms:
                _log.warning(
                    "task %s: lease_ttl_s=%s is not above the session timeouts (%d ms); "
                    "lower PGBATCH_SESSION_LOCK_TIMEOUT_MS and "
                    "PGBATCH_SESSION_IDLE_IN_TRANSACTION_TIMEOUT_MS below the lease",
                    spec.name, spec.lease_ttl_s, bound_ms,
                )  # fmt: skip

    def _heartbeat_interval_s(self) -> float:
        ttls = [a.shard.lease_ttl_s for a in self._active.values()]
        return min(ttls) / 3 if ttls else HEARTBEAT_IDLE_S

    async def _sleep_until_heartbeat_due(self) -> bool:
        """Sleep until the leases' heartbeat is due (True) or the registry's beat is (False).

        The lease deadline survives a wake-up for the registry, so the registry's beat
        never delays a lease renewal, and leases are not renewed more often for it.
        """
        if self._lease_deadline is None:
            self._lease_added.clear()
            self._lease_deadline = time.monotonic() + self._heartbeat_interval_s()
        while True:
            now = time.monotonic()
            if now >= self._lease_deadline:
                self._lease_deadline = None
                return True
            if now >= self._next_beat:
                return False
            try:
                await asyncio.wait_for(
                    self._lease_added.wait(), min(self._lease_deadline, self._next_beat) - now
                )
            except TimeoutError:
                continue
            # A newly claimed shard may hold a shorter lease than any before it: the next
            # heartbeat comes within a third of its TTL.
            self._lease_added.clear()
            self._lease_deadline = min(
                self._lease_deadline, time.monotonic() + self._heartbeat_interval_s()
            )

    async def _rescue_loop(self) -> None:
        assert self._db is not None
        interval = self.settings.rescue_interval_s
        while True:
            # Jitter so that many workers do not rescue in lock step.
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                async with self._db.connection() as conn:
                    report = await rescue_expired_leases(
                        conn, free_reruns=self.settings.lease_free_reruns
                    )
                    rescued = report.rescued
                    rescued += await rescue_expired_callbacks(
                        conn, max_attempts=self.settings.callback_max_attempts
                    )
            except psycopg.Error as exc:
                _log.warning("lease rescue failed: %s", exc)
                continue
            self.stats.lease_refunds += report.refunded
            if rescued:
                self.stats.rescued += rescued
                _log.info("returned %d expired leases to the queue", rescued)

    def _prune_hooks(self) -> list[PruneHook]:
        return [w.prune_rows for w in self.app.workloads if w.prune_rows is not None]

    def _on_prune_report(self, report: PruneReport) -> None:
        self.stats.batches_pruned += len(report.pruned)

    # -- wake-ups --------------------------------------------------------------------------

    def _on_notify(self, channel: str, payload: str) -> None:
        if channel == "pgbatch_callbacks":
            self._callback_wake.set()
        elif payload in self.queues:
            self._wake.set()

    def _on_listen_connect(self) -> None:
        # Anything sent while nobody listened is picked up by a claim now.
        self._wake.set()
        self._callback_wake.set()

    # -- completion callbacks ----------------------------------------------------------------

    async def _callback_loop(self) -> None:
        assert self._db is not None
        names = sorted(self.app.callbacks)
        if not names:
            return
        while not self._stopping.is_set():
            self._callback_wake.clear()
            try:
                async with self._db.connection() as conn:
                    claimed = await claim_callbacks(
                        conn,
                        names=names,
                        limit=CALLBACK_CLAIM_LIMIT,
                        lease_ttl_s=self.settings.callback_lease_ttl_s,
                    )
            except psycopg.Error as exc:
                _log.warning("callback claim failed: %s", exc)
                claimed = []
            for callback in claimed:
                await self._run_callback(self.app.callbacks[callback.name], callback)
            if not claimed:
                await self._wait_any(self._callback_wake, timeout=self.settings.poll_interval_s)

    async def _run_callback(self, spec: CallbackSpec, callback: ClaimedCallback) -> None:
        assert self._db is not None
        db = self._db
        try:
            async with db.connection() as conn:
                batch = await get_batch(conn, callback.batch_id)
            ctx = CallbackContext(
                callback_id=callback.id,
                attempt=callback.attempts,
                run_no=callback.run_no,
                batch_status=BatchStatus(callback.batch_status),
            )
            await spec.fn(batch, ctx)

            async def commit(conn: psycopg.AsyncConnection[Any]) -> bool:
                if not await finish_callback(conn, callback):
                    return False
                await copy_table_rows(conn, ctx.writes)
                await execute_statements(conn, ctx.statements)
                return True

            if await db.run_in_transaction(commit):
                self.stats.callbacks_run += 1
        except Exception as exc:
            self.stats.callbacks_failed += 1
            _log.warning("callback %s for batch %d failed: %s", spec.name, callback.batch_id, exc)
            with contextlib.suppress(psycopg.Error):
                async with db.connection() as conn:
                    await fail_callback(
                        conn,
                        callback,
                        error=f"{type(exc).__name__}: {exc}"[:2000],
                        delay_s=self._backoff_s(callback.attempts),
                        max_attempts=self.settings.callback_max_attempts,
                    )


# An Item's seq (its first field), read in C over a shard's items.
_seq_of = itemgetter(0)


def _is_connection_loss(conn: psycopg.AsyncConnection[Any], exc: psycopg.Error) -> bool:
    """Tell whether `exc` is the database going away rather than an error of a statement."""
    state = exc.sqlstate or ""
    # 08: connection exceptions; 57P0x: the server is shutting down or restarting.
    return conn.broken or conn.closed or state.startswith("08") or state.startswith("57P0")


async def _run_part(spec: TaskSpec, items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Run the handler on part of a shard (isolation); raise if that run fails."""
    call = spec.fn(items, ctx)
    if spec.timeout_s is None:
        outcomes = await call
    else:
        try:
            outcomes = await asyncio.wait_for(call, spec.timeout_s)
        except TimeoutError:
            raise RunFailed(f"handler timed out after {spec.timeout_s} s") from None
    problem = _check_outcomes(outcomes, len(items))
    if problem:
        raise RunFailed(problem)
    return list(outcomes)


def _check_outcomes(outcomes: object, expected: int) -> str | None:
    if not isinstance(outcomes, list | tuple):
        return f"handler returned {type(outcomes).__name__}, expected a list of outcomes"
    if len(outcomes) != expected:
        return f"handler returned {len(outcomes)} outcomes for {expected} items"
    # One C-level pass for the common case; the loop below only names the culprit.
    if all(map(isinstance, outcomes, repeat(Outcome))):
        return None
    for outcome in outcomes:
        if not isinstance(outcome, Outcome):
            return (
                f"handler returned a {type(outcome).__name__} among its outcomes; "
                "use pgbatch.ok(value) or pgbatch.error(message)"
            )
    return None
