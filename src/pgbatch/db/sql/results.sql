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
