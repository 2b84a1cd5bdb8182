-- name: metrics_snapshot
-- Queued and running shards are counted on their partial indexes; finished ones come from
-- the batch counters, so a scrape never reads the whole shard history.
-- Pruned batches' totals live on in counters (retention_detach), so these never go down.
WITH pruned AS (
    SELECT coalesce(sum(value) FILTER (WHERE name = 'pruned_shards_done'), 0) AS shards_done,
           coalesce(sum(value) FILTER (WHERE name = 'pruned_shards_dead'), 0) AS shards_dead,
           coalesce(sum(value) FILTER (WHERE name = 'pruned_items_ok'), 0) AS items_ok,
           coalesce(sum(value) FILTER (WHERE name = 'pruned_items_failed'), 0) AS items_failed,
           coalesce(sum(value) FILTER (WHERE name = 'pruned_items_cancelled'), 0)
               AS items_cancelled,
           coalesce(sum(value) FILTER (WHERE name = 'batches_pruned'), 0) AS batches
    FROM pgbatch.counters
    WHERE name IN ('pruned_shards_done', 'pruned_shards_dead', 'pruned_items_ok',
                   'pruned_items_failed', 'pruned_items_cancelled', 'batches_pruned')
)
SELECT (SELECT count(*) FROM pgbatch.shards WHERE status = 'queued') AS queued,
       (SELECT count(*) FROM pgbatch.shards WHERE status = 'running') AS running,
       coalesce(sum(shards_done - shards_dead), 0)
           + (SELECT shards_done - shards_dead FROM pruned) AS done,
       coalesce(sum(shards_dead), 0) + (SELECT shards_dead FROM pruned) AS dead,
       coalesce(sum(items_ok), 0) + (SELECT items_ok FROM pruned) AS items_ok,
       coalesce(sum(items_failed), 0) + (SELECT items_failed FROM pruned) AS items_failed,
       coalesce(sum(items_cancelled), 0) + (SELECT items_cancelled FROM pruned)
           AS items_cancelled,
       (SELECT coalesce(sum(value), 0) FROM pgbatch.counters WHERE name = 'lease_takeovers')
           AS lease_takeovers,
       (SELECT coalesce(sum(value), 0) FROM pgbatch.counters WHERE name = 'lease_refunds')
           AS lease_refunds,
       (SELECT batches FROM pruned) AS batches_pruned
FROM pgbatch.batches;

-- name: metrics_batches
SELECT status, count(*) FROM pgbatch.batches GROUP BY status;
