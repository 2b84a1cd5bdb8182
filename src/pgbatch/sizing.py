"""Shard sizing: the formulas of docs/sizing.md, and a suggestion computed from them.

A shard of `s` items takes about `s·t + o + c` (per-item handler time t, per-shard
overhead o for claim and completion statements, commit latency c). It should be long
against `o + c`, so overhead stays a few percent, and short against the lease TTL L, so
a crash costs little rework and a heartbeat gap does not lose the lease.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ShardSizeSuggestion", "suggest_shard_size"]

# Overhead a shard may add on top of its handler time: 3% keeps end-to-end throughput
# within a few percent of the handler's own.
DEFAULT_MAX_OVERHEAD_FRACTION = 0.03
# A shard should take at most a tenth of its lease: a crash then costs at most a tenth
# of a TTL of rework, and three heartbeats (at TTL/3) fit in many times over.
DEFAULT_MAX_LEASE_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class ShardSizeSuggestion:
    """A suggested shard size and the numbers behind it."""

    shard_size: int
    shard_seconds: float
    overhead_fraction: float
    lease_fraction: float
    note: str


def suggest_shard_size(
    *,
    item_s: float,
    overhead_s: float,
    commit_s: float,
    lease_ttl_s: float,
    max_overhead_fraction: float = DEFAULT_MAX_OVERHEAD_FRACTION,
    max_lease_fraction: float = DEFAULT_MAX_LEASE_FRACTION,
) -> ShardSizeSuggestion:
    """Return the smallest shard size whose overhead is under `max_overhead_fraction`."""
    if item_s < 0 or overhead_s < 0 or commit_s < 0:
        raise ValueError("times must not be negative")
    if lease_ttl_s <= 0:
        raise ValueError("lease_ttl_s must be positive")
    fixed = overhead_s + commit_s
    if item_s == 0:
        size = 1000  # no-op handlers: large shards, bounded by memory per claim
        note = "handler time is zero: overhead dominates at any size; 1000 keeps claims small"
    else:
        size = max(1, math.ceil(fixed / (max_overhead_fraction * item_s)))
        ceiling = math.floor((max_lease_fraction * lease_ttl_s - fixed) / item_s)
        note = "overhead-bound"
        if ceiling < 1:
            size, note = 1, "even one item is long against the lease: raise lease_ttl_s"
        elif size > ceiling:
            size, note = ceiling, "lease-bound: a larger shard would be long against the lease"
    shard_seconds = size * item_s + fixed
    return ShardSizeSuggestion(
        shard_size=size,
        shard_seconds=shard_seconds,
        overhead_fraction=fixed / shard_seconds if shard_seconds else 0.0,
        lease_fraction=shard_seconds / lease_ttl_s,
        note=note,
    )
