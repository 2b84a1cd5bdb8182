-- name: verify_batch
-- Read-back checks of invariant 4: every item has exactly one terminal result. Counted
-- from the blocks (a position each) and the error rows, without expanding a block.
WITH ib AS (
    SELECT first_seq, json_array_length(payloads) AS n
    FROM pgbatch.item_blocks WHERE batch_id = %(batch_id)s
), rb AS (
    SELECT first_seq, json_array_length(outputs) AS n
    FROM pgbatch.result_blocks WHERE batch_id = %(batch_id)s
), er AS (
    SELECT count(*) AS n, count(*) FILTER (WHERE retrying) AS retrying
    FROM pgbatch.result_errors WHERE batch_id = %(batch_id)s
)
SELECT
    (SELECT coalesce(sum(n), 0) FROM ib) AS items,
    (SELECT coalesce(sum(n), 0) FROM rb) - (SELECT retrying FROM er) AS results,
    (SELECT coalesce(sum(n), 0) FROM rb) - (SELECT n FROM er) AS results_ok,
    (SELECT coalesce(sum(ib.n - coalesce(rb.n, 0)), 0)
       FROM ib LEFT JOIN rb USING (first_seq)) + (SELECT retrying FROM er)
        AS items_without_result,
    (SELECT count(*) FROM pgbatch.shards
      WHERE batch_id = %(batch_id)s AND status IN ('queued', 'running')) AS shards_open,
    (SELECT count(*) FROM pgbatch.callbacks WHERE batch_id = %(batch_id)s) AS callbacks_inserted,
    (SELECT count(*) FROM pgbatch.callbacks
      WHERE batch_id = %(batch_id)s AND status = 'done') AS callbacks_done,
    (SELECT coalesce(max(attempts), 0) FROM pgbatch.shards
      WHERE batch_id = %(batch_id)s) AS max_attempts_used;
