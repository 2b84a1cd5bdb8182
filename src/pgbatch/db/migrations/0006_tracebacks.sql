-- Failures you can debug (issue 12): a failure keeps its traceback, bounded to the last
-- TRACEBACK_MAX_CHARS characters (pgbatch/engine/failures.py), with the shard's last error and
-- with every item error it caused. Every column is nullable without a default, so
-- PostgreSQL adds them without rewriting shards or results; old rows read as "no
-- traceback".
ALTER TABLE pgbatch.shards ADD COLUMN last_traceback text;
-- When last_error was written: the batch's most recent failure is the one shown.
ALTER TABLE pgbatch.shards ADD COLUMN last_error_at timestamptz;

-- One row per distinct traceback text of a batch, keyed by a 16-byte digest of it: the
-- 100 items of a failed shard, or the same bug hit by 10,000 items, share one row, so the
-- space a batch's tracebacks take grows with its distinct failures, not its failed items.
CREATE TABLE pgbatch.tracebacks (
    batch_id  bigint NOT NULL,
    digest    bytea  NOT NULL,
    traceback text   NOT NULL,
    PRIMARY KEY (batch_id, digest)
);
-- A failed item's traceback: the digest of its row in pgbatch.tracebacks (NULL for a
-- success, for an error a handler returned with pgbatch.error(), and for old rows).
ALTER TABLE pgbatch.results ADD COLUMN traceback_digest bytea;
