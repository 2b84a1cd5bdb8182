-- name: result_copy
COPY pgbatch.results (batch_id, seq, ok, output, error) FROM STDIN;

-- name: result_list
-- A failed item's traceback is looked up only for a failed item (CASE): a page of
-- successes costs no lookup at all.
SELECT r.seq, r.ok, r.output, r.error,
       CASE WHEN NOT r.ok AND r.traceback_digest IS NOT NULL THEN
           (SELECT t.traceback FROM pgbatch.tracebacks t
            WHERE t.batch_id = r.batch_id AND t.digest = r.traceback_digest) END
FROM pgbatch.results r
WHERE r.batch_id = %(batch_id)s AND r.seq > %(after_seq)s
ORDER BY r.seq
LIMIT %(limit)s;

-- name: result_list_errors
-- Reads the small partial index of failed items, not every result of the batch.
SELECT r.seq, r.ok, r.output, r.error,
       (SELECT t.traceback FROM pgbatch.tracebacks t
        WHERE t.batch_id = r.batch_id AND t.digest = r.traceback_digest)
FROM pgbatch.results r
WHERE r.batch_id = %(batch_id)s AND r.seq > %(after_seq)s AND NOT r.ok
ORDER BY r.seq
LIMIT %(limit)s;

-- name: result_error_groups
-- A batch's failed items grouped by their error text, largest group first, each with the
-- seqs of its first %(samples)s items and when its first and last items failed (their
-- shards' finish: a shard's first_seq is shard_no * shard_size). Memory stays flat
-- whatever the number of failures: the groups keep counts, bounds and times only, and the
-- samples of each returned group are read by a LIMITed scan of the partial index from
-- the group's first seq, not collected from every failed item (which array_agg did).
WITH batch AS (
    SELECT id, shard_size FROM pgbatch.batches WHERE id = %(batch_id)s
), grouped AS (
    SELECT r.error, count(*) AS items, min(r.seq) AS first_seq,
           min(s.finished_at) AS first_seen_at, max(s.finished_at) AS last_seen_at,
           count(*) OVER () AS groups
    FROM batch b
    JOIN pgbatch.results r ON r.batch_id = b.id AND NOT r.ok
    LEFT JOIN pgbatch.shards s ON s.batch_id = b.id AND s.shard_no = r.seq / b.shard_size
    -- A cancelled shard's items are counted as cancelled, not failed: no error group.
    WHERE s.status IS DISTINCT FROM 'cancelled'
    GROUP BY r.error
    ORDER BY count(*) DESC, min(r.seq)
    LIMIT %(limit)s
)
SELECT g.error, g.items, g.first_seq,
       coalesce(x.seqs, '{}'::bigint[]) AS sample_seqs,
       g.groups, g.first_seen_at, g.last_seen_at
FROM grouped g
CROSS JOIN LATERAL (
    SELECT array_agg(f.seq ORDER BY f.seq) AS seqs
    FROM (
        SELECT r.seq FROM pgbatch.results r
        WHERE r.batch_id = %(batch_id)s AND NOT r.ok AND r.seq >= g.first_seq
          AND r.error = g.error
          AND NOT EXISTS (
              SELECT 1 FROM pgbatch.shards s, batch b
              WHERE s.batch_id = b.id AND s.shard_no = r.seq / b.shard_size
                AND s.status = 'cancelled')
        ORDER BY r.seq
        LIMIT %(samples)s
    ) f
) x
ORDER BY g.items DESC, g.first_seq;

-- name: result_sample_inputs
-- The input and the traceback of each sample item of the error groups.
SELECT i.seq, i.payload, t.traceback
FROM pgbatch.items i
LEFT JOIN pgbatch.results r ON r.batch_id = i.batch_id AND r.seq = i.seq
LEFT JOIN pgbatch.tracebacks t ON t.batch_id = r.batch_id AND t.digest = r.traceback_digest
WHERE i.batch_id = %(batch_id)s AND i.seq = ANY(%(seqs)s::bigint[]);
