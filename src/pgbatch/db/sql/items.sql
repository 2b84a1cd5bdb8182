-- name: item_copy
COPY pgbatch.items (batch_id, seq, payload) FROM STDIN;

-- name: shard_create_many
-- Shards are contiguous seq ranges, created set-based from the sealed batch row.
INSERT INTO pgbatch.shards
    (batch_id, shard_no, first_seq, last_seq, task, queue, priority, max_attempts, lease_ttl_s)
SELECT b.id, g, g::bigint * b.shard_size,
       least((g + 1)::bigint * b.shard_size, b.total_items) - 1,
       b.task, b.queue, b.priority, b.max_attempts, b.lease_ttl_s
FROM pgbatch.batches b, generate_series(0, b.total_shards - 1) AS g
WHERE b.id = %(batch_id)s;

-- name: shard_notify_queue
SELECT pg_notify('pgbatch_shards', %(queue)s);
