"""The bounds of a batch's options, shared by the library and the HTTP API so both agree."""

from __future__ import annotations

__all__ = [
    "DEFAULT_MAX_SHARD_BYTES",
    "MAX_LEASE_TTL_S",
    "MAX_MAX_ATTEMPTS",
    "MAX_SHARD_SIZE",
    "MIN_LEASE_TTL_S",
]

# A lease shorter than this cannot be renewed in time: the heartbeat runs every TTL/3 and
# one round trip under load takes tens of ms, so with 1e-6 s every shard's lease lapsed
# before its handler ran and every shard died with a handler that never failed (issue 9).
MIN_LEASE_TTL_S = 0.5
# One day: longer is a stuck shard nobody notices (a crashed worker's shard waits this long).
MAX_LEASE_TTL_S = 86_400.0
# More attempts than this is a loop, not a retry policy (backoff caps at minutes).
MAX_MAX_ATTEMPTS = 1000
# A claim reads a shard's items in one value and a handler receives them as one list.
MAX_SHARD_SIZE = 1_000_000
# Total JSON bytes of one shard's items: the claim returns them as one text value, which
# PostgreSQL caps at 1 GB; 64 MiB keeps a shard far below that and a claim of many shards
# within a worker's memory. PGBATCH_MAX_SHARD_BYTES overrides it (Settings.max_shard_bytes).
DEFAULT_MAX_SHARD_BYTES = 64 * 1024 * 1024
# A batch's retention_s (seconds after it finishes until it is pruned): at most a
# century, far inside what PostgreSQL's interval arithmetic holds.
MAX_RETENTION_S = 100 * 365 * 24 * 3600.0
