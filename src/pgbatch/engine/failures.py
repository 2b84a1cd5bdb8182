"""A handler's failures: their bounded tracebacks, and the isolation of poison items.

When a shard's handler raises and the shard will not be retried (the handler raised
NonRetryableError, or it was the shard's last attempt), the worker bisects the shard:
it runs each half with a context of its own, keeps the outcomes and the writes of a half
that succeeds, and splits a half that fails again, down to single items. A single item
that still fails is a poison item: it fails with its own error and traceback, and every
other item succeeds. Nothing is committed here: the worker commits the good items'
outcomes and writes in the shard's one fenced completion, and the writes of every run
that failed are dropped with its context.

Bisection by default, one run per item on request (a task's isolate_poison): docs/api.md
("Poison items") has the measurements (benchmarks/poison_isolation.py). With k poison
items among n, bisection takes about 2·k·log2(n/k) handler calls instead of n, so a
handler that batches its work (one model call, one statement per run) keeps batching;
the price is that a good item next to a poison one runs up to log2(n) + 1 times, where
one run per item runs every item exactly twice (the failed run and its own).
"""

from __future__ import annotations

import traceback as tb
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

from pgbatch.db.shards import CommitStatement
from pgbatch.engine.context import ShardContext
from pgbatch.errors import NonRetryableError, Snooze
from pgbatch.models import Item, Outcome, TableRows
from pgbatch.tasks import IsolationStrategy

__all__ = [
    "TRACEBACK_MAX_CHARS",
    "TRACEBACK_MAX_FRAMES",
    "Isolation",
    "IsolationContext",
    "RunFailed",
    "describe",
    "format_traceback",
    "isolate",
    "traceback_of",
]

# A traceback keeps its innermost TRACEBACK_MAX_FRAMES frames (where the error is), then
# its last TRACEBACK_MAX_CHARS characters: 8 KiB holds a few dozen frames with their
# source lines, and bounds what a failure adds to a row and to a worker's memory however
# deep the recursion or long the message.
TRACEBACK_MAX_FRAMES = 50
TRACEBACK_MAX_CHARS = 8192


class RunFailed(Exception):
    """A run of part of a shard failed without an exception of the handler's own: it timed
    out, or returned outcomes that do not fit its items. Its message says which."""


def describe(exc: BaseException) -> str:
    """Return the one-line error of an exception: its type and message."""
    if isinstance(exc, RunFailed):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def traceback_of(exc: BaseException) -> str | None:
    """Return the bounded traceback of a handler's exception (None for a RunFailed)."""
    return None if isinstance(exc, RunFailed) else format_traceback(exc)


def format_traceback(exc: BaseException) -> str:
    """Return `exc`'s traceback as text: its innermost frames, its last 8 KiB at most.

    PostgreSQL text cannot hold NUL, so a NUL in a message is shown escaped.
    """
    # The worker's own frames above the handler say nothing about the failure: start at
    # the first frame outside pgbatch.engine (the handler's), if there is one.
    start = exc.__traceback__
    while start is not None and _is_engine_frame(start) and start.tb_next is not None:
        start = start.tb_next
    lines = tb.TracebackException(
        type(exc), exc, start, limit=-TRACEBACK_MAX_FRAMES, capture_locals=False
    ).format()
    text = "".join(lines).replace("\x00", "\\x00")
    if len(text) <= TRACEBACK_MAX_CHARS:
        return text
    cut = len(text) - TRACEBACK_MAX_CHARS
    # Start at a line boundary, and say what was dropped.
    newline = text.find("\n", cut)
    kept = text[newline + 1 :] if 0 <= newline < len(text) - 1 else text[cut:]
    return f"[{len(text) - len(kept)} characters of traceback omitted]\n{kept}"


def _is_engine_frame(entry: TracebackType) -> bool:
    return str(entry.tb_frame.f_globals.get("__name__", "")).startswith("pgbatch.engine.")


class IsolationContext(ShardContext):
    """The context of one run of part of a shard: its own writes, its shard's lease state."""

    def __init__(self, parent: ShardContext) -> None:
        super().__init__(
            batch_id=parent.batch_id,
            shard_id=parent.shard_id,
            attempt=parent.attempt,
            lease_epoch=parent.lease_epoch,
            task=parent.task,
        )
        self._parent = parent

    @property
    def lost(self) -> bool:
        """Tell whether the shard was taken over (the whole shard, not this part of it)."""
        return self._parent.lost

    @property
    def cancelled(self) -> bool:
        """Tell whether the batch was cancelled."""
        return self._parent.cancelled

    async def wait_lost(self) -> None:
        """Wait until the shard is lost or its batch cancelled."""
        await self._parent.wait_lost()


# One run of some items: their outcomes, or the exception that failed the run. The
# handler's outcomes are checked by the caller (a wrong count is a failure too).
Run = Callable[[list[Item], ShardContext], Awaitable[Sequence[Outcome]]]


@dataclass(slots=True)
class Isolation:
    """What bisecting a failed shard found: every item's outcome and the good runs' writes."""

    outcomes: list[tuple[int, Outcome]] = field(default_factory=list)
    writes: list[TableRows] = field(default_factory=list)
    statements: list[CommitStatement] = field(default_factory=list)
    runs: int = 0  # handler calls made while isolating
    # The seqs of the items that failed alone (an error a good run returned is not one).
    poison_seqs: set[int] = field(default_factory=set)
    # The first item failure that was not a NonRetryableError: with attempts left, the
    # worker retries the whole shard for it instead of failing the item.
    retryable: BaseException | None = None

    @property
    def poison(self) -> int:
        """Count the items that failed alone."""
        return len(self.poison_seqs)

    @property
    def items_ok(self) -> int:
        """Count the items that did not fail alone (a good run's outcomes)."""
        return len(self.outcomes) - self.poison


async def isolate(
    items: Sequence[Item],
    parent: ShardContext,
    run: Run,
    *,
    failure: BaseException,
    strategy: IsolationStrategy = "bisect",
) -> Isolation:
    """Find the poison items of `items`, whose run together failed with `failure`.

    "bisect" splits a failed run in halves down to single items; "per_item" runs every
    item alone. Runs happen one after the other, in seq order, so the good runs' writes
    keep the items' order. A run cancelled (the lease was lost, the batch cancelled)
    cancels the isolation: nothing of it is kept.
    """
    found = Isolation()
    await _bisect(list(items), failure, parent, run, found, per_item=strategy == "per_item")
    found.outcomes.sort(key=lambda pair: pair[0])
    return found


async def _bisect(
    items: list[Item],
    failure: BaseException,
    parent: ShardContext,
    run: Run,
    found: Isolation,
    *,
    per_item: bool,
) -> None:
    if len(items) == 1:
        # Known to fail alone: no need to run it again.
        found.poison_seqs.add(items[0].seq)
        found.outcomes.append(
            (items[0].seq, Outcome(False, None, describe(failure), traceback_of(failure)))
        )
        if found.retryable is None and not isinstance(failure, NonRetryableError):
            found.retryable = failure
        return
    middle = len(items) // 2
    parts = [[item] for item in items] if per_item else [items[:middle], items[middle:]]
    for half in parts:
        ctx = IsolationContext(parent)
        found.runs += 1
        failed: Exception | None = None
        try:
            outcomes = await run(half, ctx)
        except Snooze:
            raise  # the whole shard waits: the isolation's results are dropped with it
        except Exception as exc:  # CancelledError is not an Exception: it ends the isolation
            failed = exc
        if failed is not None:
            # This run's writes die with its context: only succeeding runs are kept.
            # (Outside the except block, so a deeper failure's traceback does not chain it.)
            await _bisect(half, failed, parent, run, found, per_item=per_item)
            continue
        found.outcomes.extend(
            (item.seq, outcome) for item, outcome in zip(half, outcomes, strict=True)
        )
        found.writes.extend(ctx.writes)
        found.statements.extend(ctx.statements)
