"""Tracebacks are bounded and start at the handler; bisection finds the poison items."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

import pgbatch
from pgbatch.engine.context import ShardContext
from pgbatch.engine.failures import (
    TRACEBACK_MAX_CHARS,
    TRACEBACK_MAX_FRAMES,
    format_traceback,
    isolate,
)
from pgbatch.tasks import IsolationStrategy


def _caught(fn: object, *args: object) -> BaseException:
    try:
        fn(*args)  # type: ignore[operator]
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def _recurse(depth: int) -> None:
    if depth == 0:
        raise ValueError("at the bottom")
    _recurse(depth - 1)


def test_a_deep_traceback_keeps_its_innermost_frames_within_the_bound() -> None:
    text = format_traceback(_caught(_recurse, 300))
    assert len(text) <= TRACEBACK_MAX_CHARS + 60
    assert text.rstrip().endswith("ValueError: at the bottom")
    assert text.count("in _recurse") <= TRACEBACK_MAX_FRAMES


def test_a_huge_message_is_cut_to_its_last_characters_and_says_so() -> None:
    def boom() -> None:
        raise RuntimeError("x" * 100_000 + "\x00end")

    text = format_traceback(_caught(boom))
    assert len(text) <= TRACEBACK_MAX_CHARS + 60
    assert text.startswith("[") and "characters of traceback omitted]" in text.splitlines()[0]
    # PostgreSQL text holds no NUL: it is shown escaped.
    assert "\x00" not in text and text.rstrip().endswith("\\x00end")


def _ctx() -> ShardContext:
    return ShardContext(batch_id=1, shard_id=1, attempt=1, lease_epoch=1, task="t")


def _run_with(poison: set[int], calls: list[int]):  # type: ignore[no-untyped-def]
    async def run(items: list[pgbatch.Item], ctx: ShardContext) -> Sequence[pgbatch.Outcome]:
        calls.append(len(items))
        ctx.copy_rows("side", [(i.seq,) for i in items], columns=["seq"])
        if any(i.seq in poison for i in items):
            raise KeyError(f"poison {min(i.seq for i in items if i.seq in poison)}")
        return [pgbatch.ok(i.seq) for i in items]

    return run


@pytest.mark.parametrize("strategy", ["bisect", "per_item"])
def test_isolation_finds_each_poison_item_and_keeps_only_good_runs_writes(
    strategy: IsolationStrategy,
) -> None:
    items = [pgbatch.Item(n, n) for n in range(100)]
    for poison in ({41}, {3, 50, 97}):
        calls: list[int] = []
        found = asyncio.run(
            isolate(
                items,
                _ctx(),
                _run_with(poison, calls),
                failure=KeyError("whole"),
                strategy=strategy,
            )
        )
        assert [seq for seq, o in found.outcomes if not o.ok] == sorted(poison)
        assert found.poison == len(poison) and found.items_ok == 100 - len(poison)
        assert all(o.traceback and "KeyError" in o.traceback for _, o in found.outcomes if not o.ok)
        written = sorted(row[0] for rows in found.writes for row in rows.rows)
        assert written == [n for n in range(100) if n not in poison]
        assert found.runs == len(calls)
        # Bisection needs far fewer calls; one run per item runs each item once more.
        assert len(calls) < 100 if strategy == "bisect" else calls == [1] * 100


def test_an_unknown_isolation_strategy_is_refused_at_registration() -> None:
    app = pgbatch.App(database_url="postgresql://unused")
    with pytest.raises(pgbatch.InvalidBatchError) as caught:
        app.task("t", isolate_poison="sometimes")  # type: ignore[arg-type]
    assert caught.value.field == "isolate_poison"
    assert "t" not in app.tasks
