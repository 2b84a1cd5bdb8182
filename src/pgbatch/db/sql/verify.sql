-- name: verify_batch
-- Read-back checks of invariant 4: every item has exactly one terminal result.
SELECT
    (SELECT count(*) FROM pgbatch.items WHERE batch_id = %(batch_id)s) AS items,
    (SELECT count(*) FROM pgbatch.results WHERE batch_id = %(batch_id)s) AS results,
    (SELECT count(*) FROM pgbatch.results WHERE batch_id = %(batch_id)s AND ok) AS results_ok,
    (SELECT count(*) FROM pgbatch.items i
      WHERE i.batch_id = %(batch_id)s
        AND NOT EXISTS (SELECT 1 FROM pgbatch.results r
                        WHERE r.batch_id = i.batch_id AND r.seq = i.seq)) AS items_without_result,
    (SELECT count(*) FROM pgbatch.shards
      WHERE batch_id = %(batch_id)s AND status IN ('queued', 'running')) AS shards_open,
    (SELECT count(*) FROM pgbatch.callbacks WHERE batch_id = %(batch_id)s) AS callbacks_inserted,
    (SELECT count(*) FROM pgbatch.callbacks
      WHERE batch_id = %(batch_id)s AND status = 'done') AS callbacks_done,
    (SELECT coalesce(max(attempts), 0) FROM pgbatch.shards
      WHERE batch_id = %(batch_id)s) AS max_attempts_used;
