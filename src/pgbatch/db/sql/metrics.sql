-- name: metrics_snapshot
-- Queued and running shards are counted on their partial indexes; finished ones come from
-- the batch counters, so a scrape never reads the whole shard history.
SELECT (SELECT count(*) FROM pgbatch.shards WHERE status = 'queued') AS queued,
       (SELECT count(*) FROM pgbatch.shards WHERE status = 'running') AS running,
       coalesce(sum(shards_done - shards_dead), 0) AS done,
       coalesce(sum(shards_dead), 0) AS dead,
       coalesce(sum(items_ok), 0) AS items_ok,
       coalesce(sum(items_failed), 0) AS items_failed,
       coalesce(sum(items_cancelled), 0) AS items_cancelled,
       (SELECT coalesce(sum(value), 0) FROM pgbatch.counters WHERE name = 'lease_takeovers')
           AS lease_takeovers,
       (SELECT coalesce(sum(value), 0) FROM pgbatch.counters WHERE name = 'lease_refunds')
           AS lease_refunds
FROM pgbatch.batches;

-- name: metrics_batches
SELECT status, count(*) FROM pgbatch.batches GROUP BY status;
