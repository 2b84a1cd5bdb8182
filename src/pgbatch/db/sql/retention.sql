-- name: retention_candidates
-- Final batches due for pruning, oldest first: past their retention, or (on request)
-- finished before %(finished_before)s whatever their retention. Read only; the detach
-- re-checks each one under its row lock.
SELECT b.id FROM pgbatch.batches b
WHERE b.finished_at IS NOT NULL
  AND b.status IN ('succeeded', 'failed', 'cancelled')
  AND ((b.retention_s IS NOT NULL
        AND b.finished_at + b.retention_s * interval '1 second' <= coalesce(%(now)s, now()))
       OR b.finished_at < %(finished_before)s::timestamptz)
ORDER BY b.finished_at, b.id
LIMIT %(limit)s;

-- name: retention_detach
-- The one short transaction that makes a batch "pruned": lock its row (waiting at most
-- the caller's lock_timeout), re-check under the lock that it is final and due (a retry
-- that reopened it, or a callback still to run, keeps it), leave its tombstone and
-- delete the row (its callbacks cascade: one per run). Its shards, items, results and
-- workload rows go afterwards in chunks (retention_clean_chunk). No row back: not pruned.
WITH target AS (
    SELECT b.id, b.tenant, b.task, b.status, b.total_items, b.finished_at,
           b.shards_done, b.shards_dead, b.items_ok, b.items_failed, b.items_cancelled
    FROM pgbatch.batches b
    WHERE b.id = %(batch_id)s
      AND b.finished_at IS NOT NULL
      AND b.shards_done = b.total_shards
      AND b.status IN ('succeeded', 'failed', 'cancelled')
      AND ((b.retention_s IS NOT NULL
            AND b.finished_at + b.retention_s * interval '1 second' <= coalesce(%(now)s, now()))
           OR b.finished_at < %(finished_before)s::timestamptz)
      AND NOT EXISTS (SELECT 1 FROM pgbatch.callbacks c
                      WHERE c.batch_id = b.id AND c.status IN ('queued', 'running'))
    FOR UPDATE
), tomb AS (
    INSERT INTO pgbatch.pruned_batches (id, tenant, task, status, total_items, finished_at)
    SELECT id, tenant, task, status, total_items, finished_at FROM target
    ON CONFLICT (id) DO NOTHING
    RETURNING id
), gone AS (
    DELETE FROM pgbatch.batches b USING tomb t WHERE b.id = t.id
    RETURNING b.id
), counted AS (
    -- The pruned batch's totals move to counters: the metrics' sums over batches (shards
    -- done, items finished) must not go down when a batch goes.
    INSERT INTO pgbatch.counters AS c (name, value)
    SELECT v.name, v.value
    FROM target t JOIN gone g ON g.id = t.id,
         LATERAL (VALUES ('batches_pruned', 1::bigint),
                         ('pruned_items_cancelled', t.items_cancelled),
                         ('pruned_items_failed', t.items_failed),
                         ('pruned_items_ok', t.items_ok),
                         ('pruned_shards_dead', t.shards_dead::bigint),
                         ('pruned_shards_done', t.shards_done::bigint)) AS v(name, value)
    ORDER BY v.name
    ON CONFLICT (name) DO UPDATE SET value = c.value + excluded.value
)
SELECT id FROM gone;

-- name: retention_unclean
-- Tombstones whose rows are not all gone yet (a pruner stopped half-way, or is at work).
SELECT id FROM pgbatch.pruned_batches WHERE cleaned_at IS NULL ORDER BY id LIMIT %(limit)s;

-- name: retention_clean_range
-- One bounded step of a pruned batch's removal: its item and result blocks with first_seq
-- and its failed items' rows with seq in [%(lo)s, %(hi)s), and its shards with shard_no in
-- that range, by primary-key range. A range, not "the first N left": rows deleted by
-- earlier steps stay in the index as dead entries until vacuum, and a "first N" scan
-- would read all of them again at every step (quadratic: 87 s for a million items,
-- against seconds by range). The tombstone's row lock (SKIP LOCKED) makes one pruner at a
-- time clean a batch; another skips it.
WITH claim AS (
    SELECT id FROM pgbatch.pruned_batches
    WHERE id = %(batch_id)s AND cleaned_at IS NULL
    FOR UPDATE SKIP LOCKED
), shards AS (
    DELETE FROM pgbatch.shards s
    USING claim c
    WHERE s.batch_id = c.id AND s.shard_no >= %(lo)s AND s.shard_no < %(hi)s
    RETURNING 1
), items AS (
    DELETE FROM pgbatch.item_blocks i
    USING claim c
    WHERE i.batch_id = c.id AND i.first_seq >= %(lo)s AND i.first_seq < %(hi)s
    RETURNING 1
), results AS (
    DELETE FROM pgbatch.result_blocks r
    USING claim c
    WHERE r.batch_id = c.id AND r.first_seq >= %(lo)s AND r.first_seq < %(hi)s
    RETURNING 1
), errors AS (
    DELETE FROM pgbatch.result_errors r
    USING claim c
    WHERE r.batch_id = c.id AND r.seq >= %(lo)s AND r.seq < %(hi)s
    RETURNING 1
)
SELECT (SELECT count(*) FROM claim)::int AS claimed,
       (SELECT count(*) FROM shards) + (SELECT count(*) FROM items)
           + (SELECT count(*) FROM results) + (SELECT count(*) FROM errors) AS deleted,
       (SELECT total_items FROM pgbatch.pruned_batches WHERE id = %(batch_id)s) AS total_items;

-- name: retention_clean_rest
-- The last step: whatever a range did not cover (nothing, for rows pgbatch wrote; this
-- makes "no orphans" hold whatever the seqs), at most %(limit)s rows per table.
WITH claim AS (
    SELECT id FROM pgbatch.pruned_batches
    WHERE id = %(batch_id)s AND cleaned_at IS NULL
    FOR UPDATE SKIP LOCKED
), shards AS (
    DELETE FROM pgbatch.shards s
    WHERE s.id IN (SELECT q.id FROM pgbatch.shards q JOIN claim c ON q.batch_id = c.id
                   ORDER BY q.batch_id, q.shard_no LIMIT %(limit)s)
    RETURNING 1
), items AS (
    DELETE FROM pgbatch.item_blocks i
    WHERE i.batch_id = %(batch_id)s
      AND i.first_seq IN (SELECT q.first_seq FROM pgbatch.item_blocks q
                          JOIN claim c ON q.batch_id = c.id
                          ORDER BY q.first_seq LIMIT %(limit)s)
    RETURNING 1
), results AS (
    DELETE FROM pgbatch.result_blocks r
    WHERE r.batch_id = %(batch_id)s
      AND r.first_seq IN (SELECT q.first_seq FROM pgbatch.result_blocks q
                          JOIN claim c ON q.batch_id = c.id
                          ORDER BY q.first_seq LIMIT %(limit)s)
    RETURNING 1
), errors AS (
    DELETE FROM pgbatch.result_errors r
    WHERE r.batch_id = %(batch_id)s
      AND r.seq IN (SELECT q.seq FROM pgbatch.result_errors q JOIN claim c ON q.batch_id = c.id
                    ORDER BY q.seq LIMIT %(limit)s)
    RETURNING 1
), tracebacks AS (
    -- The batch's distinct traceback texts (0006): keyed by digest, not by seq.
    DELETE FROM pgbatch.tracebacks t
    WHERE t.batch_id = %(batch_id)s
      AND t.digest IN (SELECT q.digest FROM pgbatch.tracebacks q JOIN claim c ON q.batch_id = c.id
                       ORDER BY q.digest LIMIT %(limit)s)
    RETURNING 1
)
SELECT (SELECT count(*) FROM claim)::int AS claimed,
       (SELECT count(*) FROM shards) + (SELECT count(*) FROM items)
           + (SELECT count(*) FROM results) + (SELECT count(*) FROM errors)
           + (SELECT count(*) FROM tracebacks) AS deleted;

-- name: retention_mark_clean
UPDATE pgbatch.pruned_batches SET cleaned_at = now()
WHERE id = %(batch_id)s AND cleaned_at IS NULL;

-- name: retention_tombstone
-- A pruned batch's tombstone, for its tenant only (null tenant: the library's view).
SELECT id, pruned_at, finished_at FROM pgbatch.pruned_batches
WHERE id = %(batch_id)s AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s);

-- name: retention_batch_exists
SELECT EXISTS (SELECT 1 FROM pgbatch.batches WHERE id = %(batch_id)s);

-- name: retention_try_lock
-- One automatic pruner at a time across all processes: a session-level advisory lock.
SELECT pg_try_advisory_lock(hashtext('pgbatch.retention'));

-- name: retention_unlock
SELECT pg_advisory_unlock(hashtext('pgbatch.retention'));

-- name: retention_lock_timeout
-- A pruner never waits on a row lock for long: claims and completions go first.
SELECT set_config('lock_timeout', %(lock_timeout)s, true);

-- name: retention_table_bytes
-- Total size (heap, indexes, TOAST) of each of pgbatch's per-batch tables. Items and
-- results keep their names (0009 stores them as blocks): "items" is item_blocks,
-- "results" result_blocks and result_errors together.
SELECT CASE c.relname WHEN 'item_blocks' THEN 'items'
                      WHEN 'result_blocks' THEN 'results'
                      WHEN 'result_errors' THEN 'results'
                      ELSE c.relname END AS name,
       sum(pg_total_relation_size(c.oid))::bigint
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = 'pgbatch' AND c.relkind = 'r'
  AND c.relname IN ('batches', 'item_blocks', 'shards', 'result_blocks', 'result_errors',
                    'callbacks', 'pruned_batches')
GROUP BY 1
ORDER BY 1;

-- name: retention_vacuum_due
-- Which of %(tables)s (pgbatch's own tables that pruning deletes from) no vacuum, manual or
-- automatic, has processed for %(interval_s)s seconds: a pass that deleted rows vacuums
-- only those, so the pruners of many workers vacuum a table at most once per interval.
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_all_tables s ON s.relid = c.oid
WHERE n.nspname = 'pgbatch' AND c.relkind = 'r' AND c.relname = ANY(%(tables)s::text[])
  AND coalesce(greatest(s.last_vacuum, s.last_autovacuum), '-infinity')
      <= now() - %(interval_s)s * interval '1 second'
ORDER BY c.relname;

-- name: retention_vacuum
-- A plain VACUUM of one table (never FULL: that would lock out claims and completions).
-- SKIP_LOCKED: a table another vacuum (autovacuum's) or a migration holds is skipped, not
-- waited for. Run outside a transaction block, on the pruner's autocommit session.
VACUUM (SKIP_LOCKED) pgbatch.{table};

-- name: retention_session_lock_timeout_get
SELECT current_setting('lock_timeout');

-- name: retention_session_lock_timeout_set
-- The session's lock_timeout around the pruner's vacuums: a VACUUM is a transaction of its
-- own, so a transaction-local setting would not reach it. Restored afterwards.
SELECT set_config('lock_timeout', %(lock_timeout)s, false);
