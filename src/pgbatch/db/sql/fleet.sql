-- name: worker_beat
-- A worker's registry heartbeat, once per PGBATCH_WORKER_BEAT_S, whatever the number of
-- shards it holds: it inserts or refreshes its row, and deletes the rows of workers
-- silent past their gc_after_s (SKIP LOCKED: two workers collecting together never wait
-- on each other, and the table stays as small as the fleet).
WITH gone AS (
    DELETE FROM pgbatch.workers w
    WHERE w.id IN (SELECT o.id FROM pgbatch.workers o
                   WHERE o.id <> %(id)s
                     AND o.heartbeat_at < now() - o.gc_after_s * interval '1 second'
                   ORDER BY o.id
                   FOR UPDATE SKIP LOCKED)
)
INSERT INTO pgbatch.workers AS w (id, host, pid, queues, tasks, concurrency, slots_in_use,
                                  version, ttl_s, gc_after_s)
VALUES (%(id)s, %(host)s, %(pid)s, %(queues)s, %(tasks)s, %(concurrency)s, %(slots_in_use)s,
        %(version)s, %(ttl_s)s, %(gc_after_s)s)
ON CONFLICT (id) DO UPDATE
SET slots_in_use = excluded.slots_in_use, heartbeat_at = now(), queues = excluded.queues,
    tasks = excluded.tasks, concurrency = excluded.concurrency, ttl_s = excluded.ttl_s,
    gc_after_s = excluded.gc_after_s;

-- name: worker_remove
-- A worker that stops cleanly leaves the registry at once.
DELETE FROM pgbatch.workers WHERE id = %(id)s;

-- name: worker_list
-- The whole registry (one row per worker process: as small as the fleet), live first.
SELECT id, host, pid, queues, tasks, concurrency, slots_in_use, version, started_at,
       heartbeat_at, ttl_s,
       heartbeat_at + ttl_s * interval '1 second' < now() AS expired,
       greatest(0, extract(epoch FROM now() - heartbeat_at))::float8 AS silent_s
FROM pgbatch.workers
ORDER BY expired, id;

-- name: worker_running_batches
-- Which of one tenant's batches (every tenant's when %(tenant)s is NULL: the CLI) each
-- worker holds shards of: the running shards only (bounded by the fleet's slots).
SELECT worker_id, batch_id, count(*) AS shards
FROM pgbatch.shards
WHERE status = 'running' AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
  AND worker_id IS NOT NULL
GROUP BY worker_id, batch_id
ORDER BY worker_id, batch_id;

-- name: queue_list
-- Every queue anyone can see (with queued or running shards, a live worker, or paused):
-- paused or not, its depth and the wait of its oldest claimable shard. Counted over the
-- tenant's shards, or everyone's when %(tenant)s is NULL (/metrics). The queued counts
-- come from a scan of shards_tenant_claim_idx (0012), the running ones from the
-- running shards' partial index: never a scan of the shard history.
WITH queued AS (
    SELECT queue, count(*) AS shards, min(run_after) AS oldest
    FROM pgbatch.shards
    WHERE status = 'queued' AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
    GROUP BY queue
), running AS (
    SELECT queue, count(*) AS shards
    FROM pgbatch.shards
    WHERE status = 'running' AND (%(tenant)s::text IS NULL OR tenant = %(tenant)s::text)
    GROUP BY queue
), live AS (
    SELECT q.queue, count(*) AS workers
    FROM pgbatch.workers w, unnest(w.queues) AS q(queue)
    WHERE w.heartbeat_at + w.ttl_s * interval '1 second' >= now()
    GROUP BY q.queue
), names AS (
    SELECT queue FROM queued UNION SELECT queue FROM running
    UNION SELECT queue FROM live UNION SELECT queue FROM pgbatch.queue_pauses
)
SELECT n.queue, p.queue IS NOT NULL AS paused, p.paused_at,
       coalesce(qd.shards, 0) AS queued_shards, coalesce(r.shards, 0) AS running_shards,
       coalesce(greatest(0, extract(epoch FROM now() - qd.oldest)), 0)::float8 AS oldest_s,
       coalesce(l.workers, 0) AS live_workers
FROM names n
LEFT JOIN pgbatch.queue_pauses p ON p.queue = n.queue
LEFT JOIN queued qd ON qd.queue = n.queue
LEFT JOIN running r ON r.queue = n.queue
LEFT JOIN live l ON l.queue = n.queue
ORDER BY n.queue;

-- name: queue_pause
-- Pausing twice keeps the first pause. Claims read this table in the claim statement
-- itself, so every worker obeys it from its next claim on.
INSERT INTO pgbatch.queue_pauses (queue, paused_by) VALUES (%(queue)s, %(paused_by)s)
ON CONFLICT (queue) DO NOTHING;

-- name: queue_resume
-- Resuming wakes the queue's workers (pgbatch_shards carries the queue name) so they
-- claim at once, not at their next poll.
WITH resumed AS (
    DELETE FROM pgbatch.queue_pauses WHERE queue = %(queue)s RETURNING queue
)
SELECT pg_notify('pgbatch_shards', queue) FROM resumed;

-- name: batch_waiting_reasons
-- For unfinished batches given as (id, queue, task): 'queue_paused' when their queue is
-- paused, 'no_live_worker' when no live worker serves both their queue and task, else
-- NULL. Reads the two small tables only.
SELECT v.id,
       CASE WHEN EXISTS (SELECT 1 FROM pgbatch.queue_pauses p WHERE p.queue = v.queue)
                THEN 'queue_paused'
            WHEN NOT EXISTS (
                SELECT 1 FROM pgbatch.workers w
                WHERE v.queue = ANY(w.queues) AND v.task = ANY(w.tasks)
                  AND w.heartbeat_at + w.ttl_s * interval '1 second' >= now())
                THEN 'no_live_worker'
       END AS reason
FROM unnest(%(ids)s::bigint[], %(queues)s::text[], %(tasks)s::text[]) AS v(id, queue, task)
ORDER BY v.id;
