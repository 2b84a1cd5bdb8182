-- One index of queued shards by tenant instead of two (issue 13: the server's CPU per
-- shard). The fair claim takes each tenant's shards in priority order from
-- shards_tenant_claim_idx; with statistics from before a batch's shards existed, the
-- planner took shards_queued_wait_idx (tenant, queue, run_after) for it instead, read
-- every queued shard of the tenant and sorted them all to keep 256: per claim, O(queue).
-- The depth and oldest wait per queue (queue_list) read shards_tenant_claim_idx now, still
-- only the queued shards; and a submitted shard has one index entry fewer to write.
--
-- Dropping an index takes an ACCESS EXCLUSIVE lock on pgbatch.shards, and while it waits
-- for it (a worker's open flush) every claim and completion would queue behind it. So it
-- is tried with a short lock_timeout, again after a pause, until it gets the lock at once
-- (as in 0011): a claim waits at most one try. Once held, the drop is a catalog change.
DO $$
DECLARE
    previous text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', '20ms', true);
    LOOP
        BEGIN
            DROP INDEX pgbatch.shards_queued_wait_idx;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.2);
        END;
    END LOOP;
    PERFORM set_config('lock_timeout', previous, true);
END
$$;
