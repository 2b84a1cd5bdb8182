-- One index of queued shards by tenant instead of two (issue 13: the server's CPU per
-- shard). The fair claim takes each tenant's shards in priority order from
-- shards_tenant_claim_idx; with statistics from before a batch's shards existed, the
-- planner took shards_queued_wait_idx (tenant, queue, run_after) for it instead, read
-- every queued shard of the tenant and sorted them all to keep 256: per claim, O(queue).
-- The depth and oldest wait per queue (queue_list) now read the claim index, which
-- carries run_after for them, still index-only; and a submitted shard has one index
-- entry fewer to write.
--
-- The build reads pgbatch.shards under a SHARE lock: claims and completions wait for it,
-- for about as long as a sequential scan of the table.
DROP INDEX pgbatch.shards_queued_wait_idx;
DROP INDEX pgbatch.shards_tenant_claim_idx;
CREATE INDEX shards_tenant_claim_idx ON pgbatch.shards (queue, tenant, priority DESC, id)
    INCLUDE (run_after) WHERE status = 'queued';
