"""The worker's stop summary is one line a person reads, not a dataclass repr."""

from __future__ import annotations

import time

from pgbatch.engine.worker import WorkerStats


def test_the_summary_names_what_happened_and_leaves_out_zero_counts() -> None:
    stats = WorkerStats(started_at=time.monotonic() - 8.04)
    stats.shards_completed = 12
    stats.shards_retried = 1
    stats.shards_released = 2
    stats.callbacks_run = 3
    summary = stats.summary()
    assert summary.startswith("12 shards completed in 8.")
    assert "; 1 retried; 2 released unfinished (back in the queue); 3 callbacks run" in summary
    assert "dead" not in summary and "WorkerStats(" not in summary and "\n" not in summary


def test_one_shard_is_singular() -> None:
    stats = WorkerStats()
    stats.shards_completed = 1
    assert stats.summary().startswith("1 shard completed in ")
