-- The OpenAI Batch API's files and batches (migrations/0002_openai_batch_api.sql).
-- Every statement names the tenant: another tenant's id finds nothing (a 404).

-- name: openai_file_insert
INSERT INTO pgbatch.llm_files (tenant, filename, purpose, bytes)
VALUES (%(tenant)s, %(filename)s, %(purpose)s, %(bytes)s)
RETURNING id, tenant, filename, purpose, bytes, created_at;

-- name: openai_file_chunk_insert
INSERT INTO pgbatch.llm_file_chunks (file_id, seq, data)
VALUES (%(file_id)s, %(seq)s, %(data)s);

-- name: openai_file_get
SELECT id, tenant, filename, purpose, bytes, created_at
FROM pgbatch.llm_files
WHERE id = %(id)s AND tenant = %(tenant)s;

-- name: openai_file_list
-- Newest first, after the cursor (an id); one row more than asked tells has_more.
SELECT id, tenant, filename, purpose, bytes, created_at
FROM pgbatch.llm_files
WHERE tenant = %(tenant)s
  AND (%(after)s::bigint IS NULL OR id < %(after)s)
  AND (%(purpose)s::text IS NULL OR purpose = %(purpose)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: openai_file_delete
DELETE FROM pgbatch.llm_files
WHERE id = %(id)s AND tenant = %(tenant)s
RETURNING id;

-- name: openai_file_chunks
-- A few chunks per round trip, in order; the tenant is checked through the file.
SELECT c.seq, c.data
FROM pgbatch.llm_file_chunks c
JOIN pgbatch.llm_files f ON f.id = c.file_id
WHERE c.file_id = %(file_id)s AND f.tenant = %(tenant)s AND c.seq > %(after_seq)s
ORDER BY c.seq
LIMIT %(limit)s;

-- name: openai_batch_insert
INSERT INTO pgbatch.llm_batches (tenant, input_file_id, endpoint, completion_window, metadata,
                                 status)
VALUES (%(tenant)s, %(input_file_id)s, %(endpoint)s, %(completion_window)s, %(metadata)s,
        'validating')
RETURNING id;

-- name: openai_batch_fail
UPDATE pgbatch.llm_batches
SET status = 'failed', errors = %(errors)s, failed_at = now(), request_total = %(total)s
WHERE id = %(id)s AND tenant = %(tenant)s AND status = 'validating';

-- name: openai_batch_submitted
UPDATE pgbatch.llm_batches
SET status = 'submitted', batch_id = %(batch_id)s, in_progress_at = now(),
    request_total = %(total)s
WHERE id = %(id)s AND tenant = %(tenant)s AND status = 'validating';

-- name: openai_batch_get
-- include: openai_batch_columns
WHERE b.id = %(id)s AND b.tenant = %(tenant)s;

-- name: openai_batch_list
-- Newest first, after the cursor (an id); one row more than asked tells has_more.
-- include: openai_batch_columns
WHERE b.tenant = %(tenant)s AND (%(after)s::bigint IS NULL OR b.id < %(after)s)
ORDER BY b.id DESC
LIMIT %(limit)s;

-- name: openai_batch_columns
-- The OpenAI batch with its pgbatch batch's status and counters, read in one statement.
-- OpenAI counts a cancelled or expired request as failed (it is in the error file), so
-- pgbatch's cancelled items are added to the failed ones.
SELECT b.id, b.tenant, b.input_file_id, b.endpoint, b.completion_window, b.metadata,
       b.status, b.errors, b.batch_id, b.request_total, b.output_bytes, b.error_bytes,
       b.created_at, b.in_progress_at, b.failed_at, b.cancelling_at, b.expired_at,
       p.status AS run_status, p.total_items, p.items_ok,
       p.items_failed + p.items_cancelled AS items_failed, p.finished_at
FROM pgbatch.llm_batches b
LEFT JOIN pgbatch.batches p ON p.id = b.batch_id

-- name: openai_batch_mark_cancelling
UPDATE pgbatch.llm_batches
SET cancelling_at = coalesce(cancelling_at, now())
WHERE id = %(id)s AND tenant = %(tenant)s;

-- name: openai_batch_mark_expired
UPDATE pgbatch.llm_batches
SET expired_at = coalesce(expired_at, now())
WHERE id = %(id)s AND tenant = %(tenant)s;

-- name: openai_batch_set_sizes
-- The sizes of a finished batch's output and error files, counted once when first asked.
UPDATE pgbatch.llm_batches
SET output_bytes = %(output_bytes)s, error_bytes = %(error_bytes)s
WHERE id = %(id)s AND tenant = %(tenant)s;

-- name: openai_item_custom_ids
-- The custom_ids of requests whose result the engine wrote (cancelled, attempts
-- exhausted): such a result holds no line of its own.
-- Each one read from its shard's item block, at its position (core 0009).
SELECT s.seq, ib.payloads -> (s.seq - ib.first_seq)::int ->> 'custom_id'
FROM unnest(%(seqs)s::bigint[]) AS s(seq)
JOIN pgbatch.batches b ON b.id = %(batch_id)s
JOIN pgbatch.item_blocks ib ON ib.batch_id = b.id AND ib.first_seq = s.seq - s.seq %% b.shard_size
ORDER BY s.seq;

-- name: openai_batch_recover_stale
-- A create that died between recording its batch and finishing left it validating:
-- once older than %(stale_s)s, it is linked to the pgbatch batch its create had
-- submitted (found by the create's idempotency key), or failed if there is none.
WITH stale AS (
    SELECT b.id, r.id AS run_id, r.total_items
    FROM pgbatch.llm_batches b
    LEFT JOIN pgbatch.batches r
        ON r.tenant = b.tenant AND r.idempotency_key = 'openai-batch:' || b.id
    WHERE b.id = %(id)s AND b.tenant = %(tenant)s AND b.status = 'validating'
      AND b.created_at < now() - make_interval(secs => %(stale_s)s)
    FOR UPDATE OF b
)
UPDATE pgbatch.llm_batches b
SET status = CASE WHEN s.run_id IS NULL THEN 'failed' ELSE 'submitted' END,
    batch_id = s.run_id,
    request_total = coalesce(s.total_items, 0),
    in_progress_at = CASE WHEN s.run_id IS NOT NULL THEN now() END,
    failed_at = CASE WHEN s.run_id IS NULL THEN now() END,
    errors = CASE WHEN s.run_id IS NULL THEN %(errors)s END
FROM stale s
WHERE b.id = s.id;

-- name: openai_batch_run_of
-- The pgbatch batch of an OpenAI batch, whatever its tenant (for the operator's CLI).
SELECT batch_id FROM pgbatch.llm_batches WHERE id = %(id)s;
