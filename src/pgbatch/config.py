"""The one settings object: environment variables, defaults, embedded server or URL."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from pgbatch.limits import DEFAULT_MAX_SHARD_BYTES

__all__ = ["Settings"]


class Settings(BaseSettings):
    """Settings read from `PGBATCH_*` variables (and `DATABASE_URL`)."""

    model_config = SettingsConfigDict(env_prefix="PGBATCH_", extra="ignore")

    # No URL means the embedded server in data_dir; DATABASE_URL is the conventional name.
    database_url: str | None = Field(default=None, validation_alias="DATABASE_URL")
    data_dir: Path = Path(".pgbatch")
    # How long to wait for the database when connecting before giving up with an error.
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # A worker process needs a claimer, a completer, a heartbeat and a spare; more
    # connections buy nothing because handlers do not hold one.
    pool_max_size: int = Field(default=6, ge=2)
    # Fallback when a NOTIFY is lost: an idle worker claims again at least this often.
    poll_interval_s: float = Field(default=1.0, gt=0)
    # Expired leases are returned to the queue this often; the query reads a small
    # partial index, so a short interval is cheap and bounds recovery after a crash.
    rescue_interval_s: float = Field(default=1.0, gt=0)
    # Group commit of shard completions: a flush waits at most this long for company...
    completer_max_delay_ms: float = Field(default=2.0, ge=0)
    # ...and holds at most this many shards: it bounds one transaction (500 shards of 100
    # items is a 50,000-row COPY, tens of ms here) and the completer's queue (4x this).
    completer_max_batch: int = Field(default=500, ge=1)
    # Retry backoff for a failed shard: base * 2**(attempt-1), capped, then "equal jitter"
    # (half of it fixed, half random) so retries neither stampede nor come back at once.
    retry_backoff_base_s: float = Field(default=1.0, ge=0)
    retry_backoff_max_s: float = Field(default=300.0, ge=0)
    # A completion callback that keeps failing is given up after this many attempts.
    callback_max_attempts: int = Field(default=10, ge=1)
    callback_lease_ttl_s: float = Field(default=60.0, gt=0)

    # -- retention (issue 13, docs/design/retention.md) -------------------------------------
    # A finished batch is pruned this long after it finished, unless it was submitted with
    # its own retention_s (null keeps it). A week leaves time to export results; a batch's
    # rows are what makes the database grow.
    retention_s: float | None = Field(default=7 * 24 * 3600.0, ge=0)
    # Workers prune at most this often (one process at a time, under an advisory lock).
    retention_interval_s: float = Field(default=60.0, gt=0)
    # ...and at most this many batches per pass: pruning is background work.
    retention_batches_per_pass: int = Field(default=10, ge=1)
    # Rows of each table deleted per transaction: bounds a transaction to tens of ms
    # (docs/design/retention.md has the measured cost per million items).
    retention_chunk_rows: int = Field(default=10_000, ge=1)
    # A pruner waits at most this long for a row lock, then skips the batch until its
    # next pass: claims and completions are never stalled behind it.
    retention_lock_timeout_ms: int = Field(default=50, ge=1)
    # After a pass that deleted rows, the pruner runs a plain VACUUM (never FULL) of the core
    # tables it deleted from, so the next batches reuse their space at once instead of
    # after autovacuum's nap (60 s by default) and threshold: without it, 30 drains of
    # 50,000 one-item shards grew pgbatch.shards 11-fold (docs/design/retention.md).
    retention_vacuum: bool = True
    # ...but a table at most once per this long, counted from its last vacuum, manual or
    # automatic, by any process: each VACUUM reads all of a table's indexes. A VACUUM waits
    # for no lock (SKIP_LOCKED, and retention_lock_timeout_ms for its indexes).
    retention_vacuum_interval_s: float = Field(default=30.0, ge=0)

    # -- HTTP API (`pgbatch serve`) --------------------------------------------------------
    # Comma-separated `tenant:sha256:<hex digest of the token>` entries (`pgbatch token new`
    # prints one). Unset: no authentication, and the server binds to loopback only.
    api_tokens: str | None = None
    # A JSON body is parsed in memory, so it is bounded; NDJSON is streamed to the
    # database and bounded by item count and line length instead.
    api_max_json_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    api_max_items: int = Field(default=10_000_000, ge=1)
    api_max_item_bytes: int = Field(default=1024 * 1024, ge=64)
    # The document writer behind POST /v1/documents (docs/writer.md has the trade-off):
    # a flush waits at most this long for company, and holds at most this many documents.
    # 5 ms, where the library flushes at once (0): HTTP requests reach the writer spread
    # out by the server's event loop, and a 2 ms window gave flushes of ~9 documents; at
    # 5 ms they double and both CPU per document and p99 latency drop under load
    # (docs/performance.md). A library caller waits inside the flush, so waiting there
    # only pauses the lane (2f7bf7a).
    writer_max_delay_ms: float = Field(default=5.0, ge=0)
    writer_max_batch: int = Field(default=256, ge=1)
    # Server-Sent Events: at most one progress event per batch per this many seconds.
    sse_min_interval_s: float = Field(default=0.25, gt=0)
    # A comment line on an idle stream this often keeps proxies from closing it.
    sse_keepalive_s: float = Field(default=15.0, gt=0)

    # -- limits ----------------------------------------------------------------------------
    # Total JSON bytes of one shard's items, checked at submit (App.submit and the API):
    # the claim reads a shard as one value, capped at 1 GB by PostgreSQL (pgbatch.limits).
    max_shard_bytes: int = Field(default=DEFAULT_MAX_SHARD_BYTES, ge=1024, le=512 * 1024 * 1024)

    # -- HTTP API hardening (issue 9) ----------------------------------------------------
    # A client must send its request line and headers within this long (a connection that
    # trickles them would otherwise be held forever). 10 s is generous for any real client.
    api_header_timeout_s: float = Field(default=10.0, gt=0)
    # A request body that sends nothing for this long is answered 408; a real client on a
    # slow link still sends a packet every few seconds.
    api_body_idle_timeout_s: float = Field(default=15.0, gt=0)
    # ...and a whole body must arrive within this long (so trickling a byte now and then
    # does not hold a slot forever): 1 GiB at 4 MB/s, about the spool limit below.
    api_body_timeout_s: float = Field(default=300.0, gt=0)
    # An NDJSON submission is spooled (memory, then a temporary file) before it takes a
    # database connection, so it is bounded by this many bytes; every other body by
    # api_max_json_bytes.
    api_max_upload_bytes: int = Field(default=1024**3, ge=1024)
    # At most this many NDJSON uploads of one tenant in progress per API process; more
    # answer 429. Each holds a spool file and a slot in the submit path.
    api_max_uploads_per_tenant: int = Field(default=4, ge=1)
    # An API request waits at most this long for a pooled connection, then answers 503
    # with Retry-After: a client retries sooner than a 30 s wait would tell it anything.
    api_pool_timeout_s: float = Field(default=5.0, gt=0)
    # A bearer token for GET /metrics (it shows every tenant's totals). Unset: /metrics
    # answers loopback peers only.
    metrics_token: str | None = None
    # A scrape is computed at most once per this many seconds, one computation at a time;
    # the rest are served from the cache (0: every scrape asks the database).
    metrics_cache_s: float = Field(default=5.0, ge=0)

    # -- session timeouts and infrastructure failures (invariant 7) -------------------------
    # Every pgbatch connection waits at most this long for a row lock (0: forever). 2 s is
    # long against a completion flush holding a batch row (ms) and short against the
    # default 30 s lease: a flush stuck behind a frozen session gives up and retries, and
    # a heartbeat never queues behind it. Migrations ignore it: they must wait.
    session_lock_timeout_ms: int = Field(default=2_000, ge=0)
    # The server ends a session left idle inside a transaction this long (its client
    # frozen, paused or half-open), releasing its locks. Keep it below the shortest lease
    # TTL; no pgbatch transaction waits on its client for more than milliseconds.
    session_idle_in_transaction_timeout_ms: int = Field(default=5_000, ge=0)
    # TCP keepalives on both ends: after idle + interval x count seconds without an answer
    # (10 + 5 x 3 = 25 s, under the default lease) a half-open session is dropped.
    # 0 for idle leaves the operating system's defaults (two hours on Linux).
    tcp_keepalives_idle_s: int = Field(default=10, ge=0)
    tcp_keepalives_interval_s: int = Field(default=5, ge=1)
    tcp_keepalives_count: int = Field(default=3, ge=1)
    # A completion flush that fails for a transient reason (lost connection, restart, lock
    # or idle timeout) is retried with backoff for up to this long without spending an
    # attempt; a minute covers a PostgreSQL restart or a failover. Then its shards' leases
    # lapse and they are rerun.
    completer_retry_max_s: float = Field(default=60.0, ge=0)
    # A shard whose lease expired (its worker lost the database, froze or died) is
    # requeued with its attempt refunded this many times; after that an expiry counts as
    # a failed attempt, so a shard that kills every process that runs it still dies.
    lease_free_reruns: int = Field(default=3, ge=0)

    # -- the worker registry and queue pauses (issue 12 §2) -------------------------------
    # A worker refreshes its row in pgbatch.workers this often (one small upsert, whatever
    # the number of shards it holds): 100 workers cost 20 upserts a second.
    worker_beat_s: float = Field(default=5.0, gt=0)
    # A worker silent this long is shown as expired and counts as serving nothing: four
    # beats may be lost before a live worker is taken for dead.
    worker_ttl_s: float = Field(default=20.0, gt=0)
    # ...and its row is deleted by another worker's beat after this long (a day: long
    # enough to read what died overnight).
    worker_gc_after_s: float = Field(default=86_400.0, gt=0)
    # Tenants whose tokens may pause and resume queues, comma-separated. Queues are shared
    # by every tenant, so an ordinary tenant's token may not. Without authentication the
    # single 'default' tenant is the operator and may.
    admin_tenants: str = ""
