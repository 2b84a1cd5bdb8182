-- name: batch_insert
-- The unique idempotency key decides "already submitted": no row back means it exists.
INSERT INTO pgbatch.batches
    (tenant, task, queue, priority, shard_size, max_attempts, lease_ttl_s, on_complete,
     idempotency_key, name, metadata, retention_s)
VALUES
    (%(tenant)s, %(task)s, %(queue)s, %(priority)s, %(shard_size)s, %(max_attempts)s, %(lease_ttl_s)s,
     %(on_complete)s, %(idempotency_key)s, %(name)s, %(metadata)s::jsonb, %(retention_s)s)
ON CONFLICT (tenant, idempotency_key) DO NOTHING
RETURNING id;

-- name: batch_get_by_idempotency_key
SELECT id, payload_hash FROM pgbatch.batches
WHERE tenant = %(tenant)s AND idempotency_key = %(idempotency_key)s;

-- name: batch_seal
-- Once every item is written: record the totals, then the shards, the callback of an
-- empty batch and the wake-up of _batch_sealed_answer, all in one round trip.
WITH sealed AS (
    UPDATE pgbatch.batches
    SET total_items  = %(total_items)s,
        total_shards = %(total_shards)s,
        payload_hash = %(payload_hash)s,
        status       = CASE WHEN %(total_shards)s = 0 THEN 'succeeded' ELSE 'pending' END,
        started_at   = CASE WHEN %(total_shards)s = 0 THEN now() END,
        finished_at  = CASE WHEN %(total_shards)s = 0 THEN now() END
    WHERE id = %(batch_id)s
    RETURNING *
),
-- include: _batch_sealed_answer

-- name: batch_submit_small
-- A short list of items in one statement: the batch, its items, shards and (if empty) its
-- callback commit as one implicit transaction in one round trip, where the COPY path
-- takes four. Same shapes as batch_insert + item_copy + batch_seal. No row back means
-- the idempotency key is taken.
WITH sealed AS (
    INSERT INTO pgbatch.batches
        (tenant, task, queue, priority, shard_size, max_attempts, lease_ttl_s, on_complete,
         idempotency_key, total_items, total_shards, payload_hash, status, started_at,
         finished_at, name, metadata, retention_s)
    VALUES
        (%(tenant)s, %(task)s, %(queue)s, %(priority)s, %(shard_size)s, %(max_attempts)s, %(lease_ttl_s)s,
         %(on_complete)s, %(idempotency_key)s, %(total_items)s, %(total_shards)s,
         %(payload_hash)s,
         CASE WHEN %(total_shards)s = 0 THEN 'succeeded' ELSE 'pending' END,
         CASE WHEN %(total_shards)s = 0 THEN now() END,
         CASE WHEN %(total_shards)s = 0 THEN now() END,
         %(name)s, %(metadata)s::jsonb, %(retention_s)s)
    ON CONFLICT (tenant, idempotency_key) DO NOTHING
    RETURNING *
), items AS (
    -- One block per shard, built by the client: its items as one JSON array text.
    INSERT INTO pgbatch.item_blocks (batch_id, first_seq, payloads)
    SELECT b.id, f.first_seq, f.payloads::json
    FROM sealed b, unnest(%(first_seqs)s::bigint[], %(blocks)s::text[]) AS f(first_seq, payloads)
),
-- include: _batch_sealed_answer

-- name: _batch_sealed_answer
-- The end of batch_seal and batch_submit_small, after their CTE "sealed" (the batch row
-- with its totals): create its shards set-based (contiguous seq ranges), finish an empty
-- batch at once with its callback, wake the workers and return the batch.
shards AS (
    INSERT INTO pgbatch.shards
        (batch_id, tenant, shard_no, first_seq, last_seq, task, queue, priority,
         max_attempts, lease_ttl_s)
    SELECT b.id, b.tenant, g, g::bigint * b.shard_size,
           least((g + 1)::bigint * b.shard_size, b.total_items) - 1,
           b.task, b.queue, b.priority, b.max_attempts, b.lease_ttl_s
    FROM sealed b, generate_series(0, b.total_shards - 1) AS g
), callback AS (
    INSERT INTO pgbatch.callbacks (batch_id, run_no, name, batch_status)
    SELECT id, run_no, on_complete, status FROM sealed
    WHERE total_shards = 0 AND on_complete IS NOT NULL
    ON CONFLICT (batch_id, run_no) DO NOTHING
    RETURNING 1
)
SELECT id, tenant, task, queue, priority, status, shard_size, max_attempts, lease_ttl_s,
       total_items, total_shards, shards_done, shards_dead, items_ok, items_failed,
       run_no, on_complete, idempotency_key, version, created_at, started_at, finished_at,
       name, metadata, items_cancelled,
       -- NOTIFY is delivered at commit; these columns only make the calls happen.
       CASE WHEN total_shards > 0 THEN pg_notify('pgbatch_shards', queue)::text END
           AS notified_shards,
       CASE WHEN EXISTS (SELECT 1 FROM callback) THEN pg_notify('pgbatch_callbacks', '')::text
       END AS notified_callbacks,
       pg_notify('pgbatch_progress', id::text)::text AS notified_progress
FROM sealed;

-- name: batch_get
SELECT id, tenant, task, queue, priority, status, shard_size, max_attempts, lease_ttl_s,
       total_items, total_shards, shards_done, shards_dead, items_ok, items_failed,
       run_no, on_complete, idempotency_key, version, created_at, started_at, finished_at,
       name, metadata, items_cancelled
FROM pgbatch.batches
-- A null tenant is the library's and the CLI's view: every batch.
WHERE id = %(batch_id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s);

-- name: batch_get_many
SELECT id, tenant, task, queue, priority, status, shard_size, max_attempts, lease_ttl_s,
       total_items, total_shards, shards_done, shards_dead, items_ok, items_failed,
       run_no, on_complete, idempotency_key, version, created_at, started_at, finished_at,
       name, metadata, items_cancelled
FROM pgbatch.batches
WHERE id = ANY(%(batch_ids)s::bigint[]);

-- name: batch_get_for_update
SELECT id, status, version, finished_at IS NOT NULL AS finished
FROM pgbatch.batches
WHERE id = %(batch_id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
FOR NO KEY UPDATE;

-- name: batch_list
-- Newest first, a page at a time: the cursor is the last id the client saw. Each filter
-- is optional (null).
SELECT id, tenant, task, queue, priority, status, shard_size, max_attempts, lease_ttl_s,
       total_items, total_shards, shards_done, shards_dead, items_ok, items_failed,
       run_no, on_complete, idempotency_key, version, created_at, started_at, finished_at,
       name, metadata, items_cancelled
FROM pgbatch.batches
WHERE (%(tenant)s::text IS NULL OR tenant = %(tenant)s)
  AND (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
  -- batches_tenant_name_id_idx and batches_metadata_idx (jsonb_path_ops: containment).
  AND (%(name)s::text IS NULL OR name = %(name)s)
  AND (%(metadata)s::jsonb IS NULL OR metadata @> %(metadata)s::jsonb)
  AND (%(created_after)s::timestamptz IS NULL OR created_at >= %(created_after)s)
  AND (%(created_before)s::timestamptz IS NULL OR created_at < %(created_before)s)
  AND (%(before_id)s::bigint IS NULL OR id < %(before_id)s)
ORDER BY id DESC
LIMIT %(limit)s;

-- name: batch_shard_states
-- How many of the batch's shards are in each state. Finished ones come from the batch's
-- counters: a shard done without failed items has no row (shard_complete_many), and an
-- earlier release's done rows must not count twice. Queued, running and cancelled shards
-- keep their rows; the done are the counted ones that are neither dead nor cancelled.
WITH open AS (
    SELECT status, count(*)::int AS n FROM pgbatch.shards
    WHERE batch_id = %(batch_id)s AND status IN ('queued', 'running', 'cancelled')
    GROUP BY status
), counted AS (
    SELECT b.shards_done - b.shards_dead
               - coalesce((SELECT n FROM open WHERE status = 'cancelled'), 0) AS done,
           b.shards_dead AS dead
    FROM pgbatch.batches b WHERE b.id = %(batch_id)s
)
SELECT status, n FROM open
UNION ALL SELECT 'done', done FROM counted WHERE done > 0
UNION ALL SELECT 'dead', dead FROM counted WHERE dead > 0;

-- name: batch_throughput
-- Items finished per time bucket: the dashboard's chart. A shard's finish time is its
-- result block's (0011: a shard done without failed items has no row any more); a block
-- written before 0011 has none, and its shard's row, which that release kept, has it. A
-- cancelled shard ran nothing (or was stopped): its items are not throughput (a block a
-- cancel wrote has no time; one a stopped worker wrote has its shard's cancelled row).
-- A block holds a shard's items: shard_size of them, fewer in the batch's last shard.
WITH b AS (
    SELECT id, shard_size, total_items FROM pgbatch.batches WHERE id = %(batch_id)s
), finished AS (
    SELECT r.finished_at AS at, least(b.shard_size, b.total_items - r.first_seq) AS items
    FROM b JOIN pgbatch.result_blocks r ON r.batch_id = b.id
    WHERE r.finished_at IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM pgbatch.shards s
          WHERE s.batch_id = b.id AND s.shard_no = r.first_seq / b.shard_size
            AND s.status = 'cancelled')
    UNION ALL
    SELECT s.finished_at, s.last_seq - s.first_seq + 1
    FROM b JOIN pgbatch.shards s ON s.batch_id = b.id
    JOIN pgbatch.result_blocks r ON r.batch_id = b.id AND r.first_seq = s.first_seq
    WHERE s.finished_at IS NOT NULL AND s.status <> 'cancelled' AND r.finished_at IS NULL
)
SELECT to_timestamp(floor(extract(epoch FROM at) / %(bucket_s)s) * %(bucket_s)s) AS bucket,
       sum(items)::bigint AS items
FROM finished
GROUP BY 1
ORDER BY 1;

-- name: batch_error_samples
SELECT seq, error FROM pgbatch.result_errors
WHERE batch_id = %(batch_id)s AND NOT retrying
  -- The items a cancel ended are counted as cancelled, not as an error (issue 12 §3).
  AND NOT (%(skip_cancelled)s AND error = 'cancelled')
ORDER BY seq
LIMIT %(limit)s;

-- name: batch_dead_shard_samples
SELECT shard_no, first_seq, last_seq, last_error FROM pgbatch.shards
WHERE batch_id = %(batch_id)s AND status = 'dead'
ORDER BY shard_no
LIMIT %(limit)s;

-- name: batch_add_progress
-- One counter update per batch per flush, rows locked in id order (invariant 6). The
-- statement that makes shards_done reach total_shards is the only one that finishes the
-- batch, and only it inserts the completion callback (invariant 3).
WITH delta AS (
    SELECT *
    FROM unnest(%(batch_ids)s::bigint[], %(shards)s::int[], %(dead)s::int[],
                %(ok)s::bigint[], %(failed)s::bigint[], %(cancelled)s::bigint[])
        AS d(batch_id, shards, dead, ok, failed, cancelled)
), locked AS (
    SELECT b.id FROM pgbatch.batches b
    WHERE b.id = ANY(%(batch_ids)s::bigint[])
    ORDER BY b.id
    FOR NO KEY UPDATE
), updated AS (
    UPDATE pgbatch.batches b
    SET shards_done  = b.shards_done + d.shards,
        shards_dead  = b.shards_dead + d.dead,
        items_ok     = b.items_ok + d.ok,
        items_failed = b.items_failed + d.failed,
        items_cancelled = b.items_cancelled + d.cancelled,
        status = CASE
            WHEN b.shards_done + d.shards < b.total_shards
                THEN CASE WHEN b.status = 'pending' THEN 'running' ELSE b.status END
            WHEN b.status = 'cancelled' THEN 'cancelled'
            WHEN b.shards_dead + d.dead > 0 THEN 'failed'
            ELSE 'succeeded' END,
        version = CASE
            WHEN b.shards_done + d.shards = b.total_shards OR b.status = 'pending'
                THEN b.version + 1 ELSE b.version END,
        started_at  = coalesce(b.started_at, now()),
        finished_at = CASE WHEN b.shards_done + d.shards = b.total_shards
                           THEN now() ELSE b.finished_at END
    FROM delta d, locked l
    WHERE b.id = d.batch_id AND l.id = b.id
    RETURNING b.id, b.run_no, b.on_complete, b.status, b.shards_done = b.total_shards AS finished
), callback AS (
    INSERT INTO pgbatch.callbacks (batch_id, run_no, name, batch_status)
    SELECT id, run_no, on_complete, status FROM updated
    WHERE finished AND on_complete IS NOT NULL
    ON CONFLICT (batch_id, run_no) DO NOTHING
    RETURNING batch_id
)
SELECT u.id, u.finished, u.status,
       u.id IN (SELECT batch_id FROM callback) AS callback_inserted,
       pg_notify('pgbatch_progress', u.id::text)::text AS notified
FROM updated u
ORDER BY u.id;

-- name: batch_cancel_queued_shards
-- Queued shards stop here and their items get a terminal 'cancelled' result; running
-- shards see the cancellation at their next heartbeat. A first-run shard gets a block of
-- nulls and an error row per item; a retried one (its block and its successes kept) has
-- its retrying rows turned into the cancellation.
WITH cancelled AS (
    UPDATE pgbatch.shards
    SET status = 'cancelled', finished_at = now()
    WHERE batch_id = %(batch_id)s AND status = 'queued'
    RETURNING first_seq, last_seq, retried
), blocks AS (
    -- No finished_at: nothing ran, so the throughput chart does not count these items.
    INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs, finished_at)
    SELECT %(batch_id)s, c.first_seq,
           ('[' || rtrim(repeat('null,', (c.last_seq - c.first_seq + 1)::int), ',') || ']')::json,
           NULL
    FROM cancelled c
    ORDER BY c.first_seq
    ON CONFLICT (batch_id, first_seq) DO NOTHING
), written AS (
    INSERT INTO pgbatch.result_errors (batch_id, seq, error)
    SELECT %(batch_id)s, g, 'cancelled'
    FROM cancelled c, generate_series(c.first_seq, c.last_seq) AS g
    WHERE NOT c.retried
    ORDER BY g
    ON CONFLICT (batch_id, seq) DO NOTHING
    RETURNING 1
), rewritten AS (
    UPDATE pgbatch.result_errors e
    SET error = 'cancelled', traceback_digest = NULL, retrying = false
    FROM cancelled c
    WHERE c.retried AND e.batch_id = %(batch_id)s
      AND e.seq BETWEEN c.first_seq AND c.last_seq AND e.retrying
    RETURNING 1
)
SELECT (SELECT count(*) FROM cancelled)::int AS shards,
       (SELECT count(*) FROM written) + (SELECT count(*) FROM rewritten) AS items;

-- name: batch_mark_cancelled
UPDATE pgbatch.batches
SET status = 'cancelled', version = version + 1
WHERE id = %(batch_id)s;

-- name: batch_set_priority
WITH shards AS (
    UPDATE pgbatch.shards SET priority = %(priority)s
    WHERE batch_id = %(batch_id)s AND status = 'queued'
)
UPDATE pgbatch.batches
SET priority = %(priority)s, version = version + 1
WHERE id = %(batch_id)s
-- Watchers see the new version (and ETag) at once.
RETURNING version, pg_notify('pgbatch_progress', id::text)::text;

-- name: batch_requeue_failed_shards
-- Dead shards, and done shards holding failed items, go back to the queue; their failed
-- items' error rows are marked retrying (no result until the rerun writes exactly one
-- again), and only those items run: the others keep their outputs in the shard's block.
WITH target AS (
    SELECT s.id, s.first_seq, s.last_seq, s.status
    FROM pgbatch.shards s
    WHERE s.batch_id = %(batch_id)s
      AND (s.status = 'dead'
           OR (s.status = 'done' AND EXISTS (
                SELECT 1 FROM pgbatch.result_errors e
                WHERE e.batch_id = s.batch_id AND e.seq BETWEEN s.first_seq AND s.last_seq
                  AND NOT e.retrying)))
    ORDER BY s.id
    FOR NO KEY UPDATE
), deleted AS (
    UPDATE pgbatch.result_errors e
    SET retrying = true
    FROM target t
    WHERE e.batch_id = %(batch_id)s AND e.seq BETWEEN t.first_seq AND t.last_seq
      AND NOT e.retrying
    RETURNING 1
), requeued AS (
    UPDATE pgbatch.shards s
    SET status = 'queued', attempts = 0, lease_refunds = 0, retried = true, run_after = now(),
        last_error = NULL, last_traceback = NULL, last_error_at = NULL, finished_at = NULL,
        worker_id = NULL
    FROM target t
    WHERE s.id = t.id
    RETURNING s.queue
)
SELECT (SELECT count(*) FROM target)::int AS shards,
       (SELECT count(*) FROM target WHERE status = 'dead')::int AS dead,
       (SELECT count(*) FROM deleted) AS items,
       (SELECT count(*) FROM requeued)::int AS requeued;

-- name: batch_reopen
UPDATE pgbatch.batches
SET shards_done  = shards_done - %(shards)s,
    shards_dead  = shards_dead - %(dead)s,
    items_failed = items_failed - %(items)s,
    status       = 'running',
    run_no       = CASE WHEN finished_at IS NULL THEN run_no ELSE run_no + 1 END,
    finished_at  = NULL,
    version      = version + 1
WHERE id = %(batch_id)s
-- The re-queued shards wake the workers of the batch's queue; watchers see the change.
RETURNING pg_notify('pgbatch_shards', queue)::text, pg_notify('pgbatch_progress', id::text)::text;

-- name: batch_set_labels
-- A client's new name and/or metadata (issue 12 §2). A null metadata keeps the stored one;
-- set_name false keeps the name (a null name with set_name clears it).
UPDATE pgbatch.batches
SET name     = CASE WHEN %(set_name)s THEN %(name)s::text ELSE name END,
    metadata = coalesce(%(metadata)s::jsonb, metadata),
    version  = version + 1
WHERE id = %(batch_id)s
-- Watchers see the new labels and version (and ETag) at once.
RETURNING version, pg_notify('pgbatch_progress', id::text)::text;
