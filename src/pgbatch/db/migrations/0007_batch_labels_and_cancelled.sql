-- Batches a person can find and read (issue 12 §2, §3).
-- A name and free-form metadata (string keys and values, as OpenAI's batch objects),
-- set at submit and filtered on by GET /v1/batches. Existing batches get none: a null
-- name and an empty object, both constant defaults, so no table rewrite.
ALTER TABLE pgbatch.batches ADD COLUMN name text;
ALTER TABLE pgbatch.batches ADD COLUMN metadata jsonb NOT NULL DEFAULT '{}';
-- Items ended by a cancellation, counted apart from failures: a cancelled batch says how
-- much was cancelled, and the items it never ran are not "failed". Batches cancelled
-- before this release counted them in items_failed, where they stay (their results say
-- 'cancelled'; rewriting the counters of finished batches is not worth a full scan).
ALTER TABLE pgbatch.batches ADD COLUMN items_cancelled bigint NOT NULL DEFAULT 0;

-- The list's filters: a tenant's batches of one name, newest first (the same shape as
-- batches_tenant_id_idx), and containment of key/value pairs (metadata @> '{"k": "v"}'),
-- ANDed with the tenant's index by a bitmap scan.
CREATE INDEX batches_tenant_name_id_idx ON pgbatch.batches (tenant, name, id DESC)
    WHERE name IS NOT NULL;
CREATE INDEX batches_metadata_idx ON pgbatch.batches USING gin (metadata jsonb_path_ops);
