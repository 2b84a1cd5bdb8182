-- name: item_copy
-- One row per shard: its items as one JSON array, in seq order from first_seq.
COPY pgbatch.item_blocks (batch_id, first_seq, payloads) FROM STDIN;

-- name: shard_notify_queue
SELECT pg_notify('pgbatch_shards', %(queue)s);
