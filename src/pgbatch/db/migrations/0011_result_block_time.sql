-- When each result block was written (issue 13): a shard that ends done with no failed
-- item is deleted by its completion (shard_complete_many), so its finish time, which fed
-- the dashboard's throughput chart (batch_throughput), now lives with its results. Added
-- without a default first, so the blocks written before this stay NULL (their shard rows,
-- kept by the previous release, still carry the time) instead of all getting the time of
-- the upgrade; then new blocks get their transaction's time. Both are catalog changes
-- only: no table rewrite.
--
-- Adding a column takes an ACCESS EXCLUSIVE lock, and while it waits for it (a worker's
-- open flush, an API stream of results) every completion's COPY into result_blocks would
-- queue behind it. So it is tried with a short lock_timeout, again after a pause, until
-- it gets the lock at once: a completion waits at most one try, never for the stream.
DO $$
DECLARE
    previous text := current_setting('lock_timeout');
BEGIN
    PERFORM set_config('lock_timeout', '20ms', true);
    LOOP
        BEGIN
            ALTER TABLE pgbatch.result_blocks ADD COLUMN finished_at timestamptz;
            EXIT;
        EXCEPTION WHEN lock_not_available THEN
            PERFORM pg_sleep(0.2);
        END;
    END LOOP;
    -- The rest of the upgrade waits for its locks as before (migration_wait_for_locks).
    PERFORM set_config('lock_timeout', previous, true);
END
$$;
ALTER TABLE pgbatch.result_blocks ALTER COLUMN finished_at SET DEFAULT now();
