-- name: callback_claim
WITH claimed AS (
    UPDATE pgbatch.callbacks c
    SET status = 'running', attempts = c.attempts + 1, lease_epoch = c.lease_epoch + 1,
        lease_expires_at = now() + %(lease_ttl_s)s * interval '1 second'
    WHERE c.id IN (
        SELECT q.id FROM pgbatch.callbacks q
        WHERE q.status = 'queued' AND q.name = ANY(%(names)s::text[]) AND q.run_after <= now()
        ORDER BY q.id
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    RETURNING c.id, c.batch_id, c.run_no, c.name, c.lease_epoch, c.attempts, c.batch_status
)
SELECT * FROM claimed ORDER BY id;

-- name: callback_done
-- Fenced like a shard completion: the callback's own writes commit with this row or not at all.
-- The progress notification (sent at commit) wakes `app.wait(..., callbacks=True)`.
UPDATE pgbatch.callbacks
SET status = 'done', finished_at = now(), lease_expires_at = NULL
WHERE id = %(callback_id)s AND status = 'running' AND lease_epoch = %(epoch)s
RETURNING id, pg_notify('pgbatch_progress', batch_id::text)::text;

-- name: callback_failed
UPDATE pgbatch.callbacks
SET status = CASE WHEN attempts >= %(max_attempts)s THEN 'dead' ELSE 'queued' END,
    run_after = now() + %(delay_s)s * interval '1 second',
    last_error = %(error)s, lease_expires_at = NULL,
    finished_at = CASE WHEN attempts >= %(max_attempts)s THEN now() END
WHERE id = %(callback_id)s AND status = 'running' AND lease_epoch = %(epoch)s
RETURNING status,
          -- A callback given up ends a wait for it too.
          CASE WHEN status = 'dead' THEN pg_notify('pgbatch_progress', batch_id::text)::text END;

-- name: callback_rescue_expired
WITH expired AS (
    SELECT id FROM pgbatch.callbacks
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
)
-- A callback whose worker keeps dying is given up after max_attempts like any other failure.
UPDATE pgbatch.callbacks c
SET status = CASE WHEN c.attempts >= %(max_attempts)s THEN 'dead' ELSE 'queued' END,
    finished_at = CASE WHEN c.attempts >= %(max_attempts)s THEN now() END,
    run_after = now(), lease_expires_at = NULL, last_error = 'lease expired'
FROM expired e
WHERE c.id = e.id
RETURNING c.id;

-- name: callback_notify
SELECT pg_notify('pgbatch_callbacks', '');

-- name: callback_status
-- The callback of one run of a batch: queued, running, done or dead (no row: none was queued).
SELECT status FROM pgbatch.callbacks WHERE batch_id = %(batch_id)s AND run_no = %(run_no)s;
