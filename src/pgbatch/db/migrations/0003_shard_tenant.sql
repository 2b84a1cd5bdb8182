-- Fair claims between tenants (issue 9): every shard carries its batch's tenant, so the
-- claim can visit the tenants with queued work (a loose index scan) and give each a share
-- instead of taking the queue's highest priorities, which one tenant's flood can own.
ALTER TABLE pgbatch.shards ADD COLUMN tenant text NOT NULL DEFAULT 'default';
-- Backfill: existing shards take their batch's tenant ('default' is already right).
UPDATE pgbatch.shards s SET tenant = b.tenant
FROM pgbatch.batches b
WHERE b.id = s.batch_id AND b.tenant <> 'default';
-- From now on the writer of a shard says whose it is: a forgotten tenant is an error,
-- not a silent 'default'.
ALTER TABLE pgbatch.shards ALTER COLUMN tenant DROP DEFAULT;

-- The claim's loose scan over the tenants of a queue, then each tenant's queued shards in
-- priority order: the same partial-index shape as shards_claim_idx, a tenant deeper.
CREATE INDEX shards_tenant_claim_idx ON pgbatch.shards (queue, tenant, priority DESC, id)
    WHERE status = 'queued';
