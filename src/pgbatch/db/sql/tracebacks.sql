-- name: traceback_insert_many
-- The distinct traceback texts of a flush's failed attempts, one row per (batch, digest):
-- a text already stored (the same bug in another shard) is not stored twice. Rows come
-- sorted by key, so concurrent flushes take the index's locks in one order (invariant 6).
INSERT INTO pgbatch.tracebacks (batch_id, digest, traceback)
SELECT batch_id, digest, traceback
FROM unnest(%(batch_ids)s::bigint[], %(digests)s::bytea[], %(texts)s::text[])
    AS t(batch_id, digest, traceback)
ORDER BY batch_id, digest
ON CONFLICT (batch_id, digest) DO NOTHING;

-- name: shard_last_failure
-- The batch's most recent shard failure still on record: a shard waiting for its retry,
-- a dead one, or a done one whose items failed alone (poison items). A shard that
-- succeeded later has no last_error. Reads the batch's shards by its (batch_id, shard_no)
-- index.
SELECT shard_no, status, first_seq, last_seq, last_error, last_traceback, last_error_at
FROM pgbatch.shards
WHERE batch_id = %(batch_id)s AND last_error IS NOT NULL
ORDER BY last_error_at DESC NULLS LAST, shard_no DESC
LIMIT 1;

-- name: shard_dead_tracebacks
SELECT shard_no, last_traceback FROM pgbatch.shards
WHERE batch_id = %(batch_id)s AND status = 'dead' AND last_traceback IS NOT NULL
  AND shard_no = ANY(%(shard_nos)s::int[]);
