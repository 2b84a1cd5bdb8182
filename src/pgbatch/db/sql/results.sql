-- name: result_block_copy
-- The result blocks of first runs of shards: one row per shard, its outputs in seq order.
COPY pgbatch.result_blocks (batch_id, first_seq, outputs) FROM STDIN;

-- name: result_error_copy
-- One row per failed item: its error and the digest of its traceback (or NULL).
COPY pgbatch.result_errors (batch_id, seq, error, traceback_digest) FROM STDIN;

-- name: result_block_merge
-- A retried shard's rerun (only its failed items ran): their outputs go to their
-- positions in the shard's result block (a failed one's stays null), and their retrying
-- error rows go; the rerun's failures are COPYed after this. The block exists when a
-- shard was retried; if it did not, it is made, null where nothing ran.
WITH patch AS (
    SELECT s.seq, o.output
    FROM unnest(%(seqs)s::bigint[]) WITH ORDINALITY AS s(seq, ord)
    JOIN json_array_elements(%(outputs)s::json) WITH ORDINALITY AS o(output, ord) USING (ord)
), gone AS (
    DELETE FROM pgbatch.result_errors e
    WHERE e.batch_id = %(batch_id)s AND e.seq = ANY(%(seqs)s::bigint[])
    RETURNING 1
)
INSERT INTO pgbatch.result_blocks AS b (batch_id, first_seq, outputs)
SELECT %(batch_id)s, %(first_seq)s,
       (SELECT json_agg(p.output ORDER BY g)
        FROM generate_series(%(first_seq)s::bigint, %(last_seq)s::bigint) AS g
        LEFT JOIN patch p ON p.seq = g)
ON CONFLICT (batch_id, first_seq) DO UPDATE
-- The rerun is when the shard ended last: the throughput chart counts it then.
SET finished_at = now(),
    outputs = (SELECT json_agg(coalesce(p.output, e.value) ORDER BY e.ord)
               FROM json_array_elements(b.outputs) WITH ORDINALITY AS e(value, ord)
               LEFT JOIN patch p ON p.seq = b.first_seq + e.ord - 1)
RETURNING (SELECT count(*) FROM gone);

-- name: result_list
-- A page of results in item order: the result blocks that hold the seqs after
-- %(after_seq)s (enough of them for %(limit)s items), each with its failed items (error,
-- traceback, retrying), in one statement. The caller expands the blocks. No batch row
-- (pruned): nothing.
SELECT rb.first_seq, rb.outputs::text,
       e.seqs, e.errors, e.tracebacks, e.retrying
FROM pgbatch.batches bt
JOIN pgbatch.result_blocks rb
  ON rb.batch_id = bt.id AND rb.first_seq > %(after_seq)s + 1 - bt.shard_size
LEFT JOIN LATERAL (
    SELECT array_agg(er.seq ORDER BY er.seq) AS seqs,
           array_agg(er.error ORDER BY er.seq) AS errors,
           array_agg(t.traceback ORDER BY er.seq) AS tracebacks,
           array_agg(er.retrying ORDER BY er.seq) AS retrying
    FROM pgbatch.result_errors er
    LEFT JOIN pgbatch.tracebacks t ON t.batch_id = er.batch_id AND t.digest = er.traceback_digest
    WHERE er.batch_id = rb.batch_id
      AND er.seq >= rb.first_seq AND er.seq < rb.first_seq + bt.shard_size
) e ON true
WHERE bt.id = %(batch_id)s
ORDER BY rb.first_seq
LIMIT (SELECT (%(limit)s + shard_size - 1) / shard_size + 1
       FROM pgbatch.batches WHERE id = %(batch_id)s);

-- name: result_list_errors
-- Reads the failed items alone (pgbatch.result_errors), never the successes.
SELECT r.seq, false, NULL::json, r.error,
       (SELECT t.traceback FROM pgbatch.tracebacks t
        WHERE t.batch_id = r.batch_id AND t.digest = r.traceback_digest)
FROM pgbatch.result_errors r
WHERE r.batch_id = %(batch_id)s AND r.seq > %(after_seq)s AND NOT r.retrying
ORDER BY r.seq
LIMIT %(limit)s;

-- name: result_error_groups
-- A batch's failed items grouped by their error text, largest group first, each with the
-- seqs of its first %(samples)s items and when its first and last items failed (their
-- shards' finish: a shard's first_seq is shard_no * shard_size). Memory stays flat
-- whatever the number of failures: the groups keep counts, bounds and times only, and the
-- samples of each returned group are read by a LIMITed scan of the error rows from the
-- group's first seq, not collected from every failed item (which array_agg did).
WITH batch AS (
    SELECT id, shard_size FROM pgbatch.batches WHERE id = %(batch_id)s
), grouped AS (
    SELECT r.error, count(*) AS items, min(r.seq) AS first_seq,
           min(s.finished_at) AS first_seen_at, max(s.finished_at) AS last_seen_at,
           count(*) OVER () AS groups
    FROM batch b
    JOIN pgbatch.result_errors r ON r.batch_id = b.id AND NOT r.retrying
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
        SELECT r.seq FROM pgbatch.result_errors r
        WHERE r.batch_id = %(batch_id)s AND NOT r.retrying AND r.seq >= g.first_seq
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
-- The input and the traceback of each sample item of the error groups: one item block
-- per sample, the item taken at its position.
SELECT s.seq, ib.payloads -> (s.seq - ib.first_seq)::int, t.traceback
FROM unnest(%(seqs)s::bigint[]) AS s(seq)
JOIN pgbatch.batches b ON b.id = %(batch_id)s
JOIN pgbatch.item_blocks ib ON ib.batch_id = b.id AND ib.first_seq = s.seq - s.seq %% b.shard_size
LEFT JOIN pgbatch.result_errors r ON r.batch_id = b.id AND r.seq = s.seq
LEFT JOIN pgbatch.tracebacks t ON t.batch_id = r.batch_id AND t.digest = r.traceback_digest;
