-- Retention (issue 13): a finished batch is removed after its retention period.
-- Seconds after finished_at; NULL keeps the batch forever. Submit writes the default
-- (PGBATCH_RETENTION_S, 7 days) unless the batch names its own. Batches made before this
-- migration have none: an upgrade never schedules the deletion of data nobody asked to
-- expire (`pgbatch prune --finished-before` removes them on request).
ALTER TABLE pgbatch.batches ADD COLUMN retention_s double precision
    CONSTRAINT batches_retention_s_check CHECK (retention_s >= 0);
-- The pruner's scan: finished batches that have a retention, oldest first.
CREATE INDEX batches_finished_retained_idx ON pgbatch.batches (finished_at)
    WHERE retention_s IS NOT NULL;

-- A pruned batch leaves a tombstone, so that its id answers "expired" (HTTP 410, with
-- when) instead of "no such batch", scoped to its tenant like the batch was. Its rows go
-- in bounded chunks after the batch row: cleaned_at is set once none is left.
CREATE TABLE pgbatch.pruned_batches (
    id          bigint      PRIMARY KEY,
    tenant      text        NOT NULL,
    task        text        NOT NULL,
    status      text        NOT NULL,
    total_items bigint      NOT NULL,
    finished_at timestamptz NOT NULL,
    pruned_at   timestamptz NOT NULL DEFAULT now(),
    cleaned_at  timestamptz
);
CREATE INDEX pruned_batches_unclean_idx ON pgbatch.pruned_batches (id) WHERE cleaned_at IS NULL;

-- Shards no longer cascade from their batch: the batch row goes in one short transaction
-- and its shards after it, in chunks, like items and results (which never had a foreign
-- key). A cascade would delete a million-shard batch's shards in that one transaction.
-- Only pgbatch writes shards, in the transactions that create or hold their batch.
ALTER TABLE pgbatch.shards DROP CONSTRAINT shards_batch_id_fkey;
