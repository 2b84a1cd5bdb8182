-- name: result_copy
COPY pgbatch.results (batch_id, seq, ok, output, error) FROM STDIN;

-- name: result_list
SELECT seq, ok, output, error
FROM pgbatch.results
WHERE batch_id = %(batch_id)s AND seq > %(after_seq)s
ORDER BY seq
LIMIT %(limit)s;

-- name: result_list_errors
-- Reads the small partial index of failed items, not every result of the batch.
SELECT seq, ok, output, error
FROM pgbatch.results
WHERE batch_id = %(batch_id)s AND seq > %(after_seq)s AND NOT ok
ORDER BY seq
LIMIT %(limit)s;

-- name: result_error_groups
-- A batch's failed items grouped by their error text, largest group first, each with the
-- seqs of its first few items. Reads only the partial index of failed items.
SELECT r.error, count(*) AS items, min(r.seq) AS first_seq,
       (array_agg(r.seq ORDER BY r.seq))[1:%(samples)s] AS sample_seqs,
       count(*) OVER () AS groups
FROM pgbatch.results r
WHERE r.batch_id = %(batch_id)s AND NOT r.ok
  -- The items a cancel ended are counted as cancelled, not as an error (issue 12 §3).
  AND NOT (%(skip_cancelled)s AND r.error = 'cancelled')
GROUP BY r.error
ORDER BY count(*) DESC, min(r.seq)
LIMIT %(limit)s;

-- name: result_sample_inputs
SELECT seq, payload FROM pgbatch.items
WHERE batch_id = %(batch_id)s AND seq = ANY(%(seqs)s::bigint[]);
