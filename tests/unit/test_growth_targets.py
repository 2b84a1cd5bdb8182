"""benchmarks/growth.py judges each kind of round against issue 13's targets."""

from __future__ import annotations

from benchmarks.growth import targets


def _round(jobs_per_s: int, shards_mb: float, batches_kb: int = 100) -> dict[str, object]:
    return {
        "shard_size": 1,
        "jobs_per_s": jobs_per_s,
        "items_per_s": jobs_per_s,
        "bytes": {"shards": int(shards_mb * 1e6), "batches": batches_kb * 1000},
    }


def test_flat_rounds_pass_every_target() -> None:
    judged = targets([_round(10_000, 37), _round(9_500, 38), _round(9_800, 37.5)])
    assert all(passed for _, _, passed in judged), judged


def test_a_slow_last_round_growing_tables_and_a_collapse_are_misses() -> None:
    judged = {what: (ratio, passed) for what, ratio, passed in targets(
        [_round(10_000, 37), _round(10_000, 80), _round(2_000, 419), _round(8_000, 40)]
    )}  # fmt: skip
    assert judged["last round x0.9 of the first"] == (0.8, False)
    ratio, passed = judged["slowest round x0.8 of the median"]
    assert round(ratio, 2) == 0.22 and not passed  # 2,000 against the median 9,000
    ratio, passed = judged["shards bytes within x1.1 of round 1"]
    assert round(ratio, 1) == 11.3 and not passed
    # A table under a megabyte is judged against a megabyte: a few pages are not growth.
    assert judged["batches bytes within x1.1 of round 1"][1]
