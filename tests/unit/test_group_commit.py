"""The group committer: batching by size and delay, own results, backpressure, final flush."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from pgbatch.engine.group_commit import GroupCommitter, GroupCommitterClosedError


class Recorder:
    """A flush function that records each flush and can be held open or made to fail."""

    def __init__(self) -> None:
        self.flushes: list[list[int]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail_whole: Exception | None = None

    async def __call__(self, items: Sequence[int]) -> list[int | BaseException]:
        await self.gate.wait()
        self.flushes.append(list(items))
        if self.fail_whole:
            raise self.fail_whole
        return [ValueError(f"odd {i}") if i % 2 else i * 10 for i in items]


@pytest.mark.asyncio
async def test_concurrent_callers_share_flushes_and_get_their_own_results() -> None:
    flush = Recorder()
    flush.gate.clear()  # hold the first flush so the others queue up behind it
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=8, max_delay_ms=5)
    calls = [asyncio.create_task(committer.submit(n)) for n in range(20)]
    await asyncio.sleep(0)
    flush.gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    await committer.stop()
    for n, result in enumerate(results):
        if n % 2:
            assert isinstance(result, ValueError) and str(result) == f"odd {n}"
        else:
            assert result == n * 10
    assert sorted(i for f in flush.flushes for i in f) == list(range(20))
    assert max(len(f) for f in flush.flushes) == 8
    assert len(flush.flushes) < 20
    assert committer.stats.items == 20 and committer.stats.flushes == len(flush.flushes)


@pytest.mark.asyncio
async def test_a_failed_flush_fails_every_caller_in_it() -> None:
    flush = Recorder()
    flush.fail_whole = RuntimeError("database gone")
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=4, max_delay_ms=1)
    results = await asyncio.gather(*(committer.submit(n) for n in range(4)), return_exceptions=True)
    await committer.stop()
    assert all(isinstance(r, RuntimeError) for r in results)
    assert committer.stats.failed_flushes >= 1


@pytest.mark.asyncio
async def test_backpressure_bounds_the_queue() -> None:
    flush = Recorder()
    flush.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter(
        flush, max_batch=2, max_delay_ms=0, max_queue=3
    )
    calls = [asyncio.create_task(committer.submit(n * 2)) for n in range(10)]
    for _ in range(5):
        await asyncio.sleep(0)
    # One flush of 2 is held open; 3 wait in the queue; the rest wait to enter it.
    assert committer.queue_depth == 3
    flush.gate.set()
    assert await asyncio.gather(*calls) == [n * 20 for n in range(10)]
    await committer.stop()


@pytest.mark.asyncio
async def test_stop_flushes_everything_accepted_and_refuses_more() -> None:
    flush = Recorder()
    flush.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=3, max_delay_ms=50)
    calls = [asyncio.create_task(committer.submit(n * 2)) for n in range(7)]
    for _ in range(5):
        await asyncio.sleep(0)
    stopping = asyncio.create_task(committer.stop())
    await asyncio.sleep(0)
    flush.gate.set()
    await stopping
    assert await asyncio.gather(*calls) == [n * 20 for n in range(7)]
    with pytest.raises(GroupCommitterClosedError):
        await committer.submit(2)


@pytest.mark.asyncio
async def test_a_lone_item_waits_at_most_max_delay() -> None:
    flush = Recorder()
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=100, max_delay_ms=20)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await committer.submit(4) == 40
    assert loop.time() - started < 5  # generous bound: it flushed without a full batch
    await committer.stop()


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommitter(Recorder(), max_batch=0, max_delay_ms=1)
    with pytest.raises(ValueError, match="max_delay_ms"):
        GroupCommitter(Recorder(), max_batch=1, max_delay_ms=-1)


@pytest.mark.asyncio
async def test_submit_nowait_hands_each_result_to_its_function_in_the_flush() -> None:
    flush = Recorder()
    flush.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=4, max_delay_ms=5)
    got: dict[int, object] = {}
    flushes_seen: dict[int, int] = {}

    def sink(n: int) -> Callable[[int | BaseException], None]:
        def record(result: int | BaseException) -> None:
            got[n] = result
            flushes_seen[n] = len(flush.flushes)  # called in the flush that holds n

        return record

    assert all(committer.submit_nowait(n, sink(n)) for n in range(6))
    waiting = asyncio.create_task(committer.submit(100))  # awaiting callers share flushes
    for _ in range(3):
        await asyncio.sleep(0)
    assert got == {}  # nothing before its flush
    flush.gate.set()
    assert await waiting == 1000
    await committer.stop()
    assert {n: r for n, r in got.items() if not isinstance(r, BaseException)} == {
        0: 0, 2: 20, 4: 40,
    }  # fmt: skip
    assert all(isinstance(got[n], ValueError) for n in (1, 3, 5))
    assert set(flushes_seen.values()) <= set(range(1, len(flush.flushes) + 1))


@pytest.mark.asyncio
async def test_submit_nowait_refuses_when_full_or_stopped_and_a_bad_sink_breaks_nothing() -> None:
    flush = Recorder()
    flush.gate.clear()
    committer: GroupCommitter[int, int] = GroupCommitter(
        flush, max_batch=1, max_delay_ms=0, max_queue=2
    )
    results: list[object] = []

    def broken(result: int | BaseException) -> None:
        raise RuntimeError("a sink that raises")

    assert committer.submit_nowait(0, broken)
    await asyncio.sleep(0)  # the flusher takes item 0 and waits at the gate
    assert committer.submit_nowait(2, results.append)
    assert committer.submit_nowait(4, results.append)
    assert not committer.submit_nowait(6, results.append)  # full: the caller must await
    flush.gate.set()
    assert await committer.submit(8) == 80  # the flusher survived the raising sink
    await committer.stop()
    assert results == [20, 40]
    assert not committer.submit_nowait(10, results.append)  # stopped


@pytest.mark.asyncio
async def test_a_failed_flush_reaches_every_sink() -> None:
    flush = Recorder()
    flush.fail_whole = RuntimeError("database gone")
    committer: GroupCommitter[int, int] = GroupCommitter(flush, max_batch=4, max_delay_ms=1)
    results: list[object] = []
    for n in range(3):
        assert committer.submit_nowait(n * 2, results.append)
    await committer.stop()  # the final flush delivers what was accepted
    assert len(results) == 3 and all(isinstance(r, RuntimeError) for r in results)
