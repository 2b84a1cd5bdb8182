-- name: item_copy
COPY pgbatch.items (batch_id, seq, payload) FROM STDIN;

-- name: shard_notify_queue
SELECT pg_notify('pgbatch_shards', %(queue)s);
