-- name: shard_claim
-- One statement claims at most %(limit)s queued shards of one queue (invariant 1), shared
-- fairly between the tenants with queued work there: each tenant offers its best shards
-- (highest priority first, then oldest), a share of ceil(limit / tenants) at most, and the
-- claim takes them round by round: every tenant's first, then every tenant's second, ...,
-- starting after %(after_tenant)s, the tenant the previous claim served last. So one
-- tenant's flood, whatever its priority, cannot hold back another tenant's batch; priority
-- orders a tenant's own work. The tenants come from a loose index scan (one index probe
-- per tenant), so with one tenant the claim costs two probes more than a priority scan.
-- SKIP LOCKED lets concurrent claimers pass each other; every claim bumps lease_epoch.
WITH RECURSIVE
-- include: _shard_claim_offered
        LIMIT ceil(%(limit)s::numeric / a.n)::int
        FOR UPDATE SKIP LOCKED
    ) o
), picked AS (
    SELECT ctid FROM offered
    ORDER BY round, tenant <= %(after_tenant)s, tenant
    LIMIT %(limit)s
),
-- include: _shard_claim_answer

-- name: shard_claim_by_priority
-- The claim before tenants were shared fairly: the queue's highest priorities, whoever owns
-- them. It tops up a fair claim that came back short (a tenant offered fewer shards than
-- its share, or they were locked), so free slots are not left idle while work is queued;
-- benchmarks/tenant_fairness.py measures it as the baseline.
WITH picked AS (
    SELECT q.ctid FROM pgbatch.shards q
    WHERE q.status = 'queued'
      AND q.queue = %(queue)s
      AND q.task = ANY(%(tasks)s::text[])
      AND q.run_after <= now()
      AND NOT EXISTS (SELECT 1 FROM pgbatch.queue_pauses p WHERE p.queue = %(queue)s)
    ORDER BY q.priority DESC, q.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
),
-- include: _shard_claim_answer

-- name: shard_claim_one
-- Claims one named shard, when a claim of many failed (issue 9: a shard whose items
-- cannot be read fails every statement that reads it): the worker then claims its
-- candidates one at a time, to find the one that fails and bury it.
WITH picked AS (
    SELECT q.ctid FROM pgbatch.shards q
    WHERE q.id = %(shard_id)s
      AND q.status = 'queued'
      AND q.task = ANY(%(tasks)s::text[])
      AND q.run_after <= now()
      AND NOT EXISTS (SELECT 1 FROM pgbatch.queue_pauses p WHERE p.queue = q.queue)
    FOR UPDATE SKIP LOCKED
),
-- include: _shard_claim_answer

-- name: shard_claim_candidates
-- The shards a fair claim of this queue would take, without claiming them (read only).
WITH RECURSIVE
-- include: _shard_claim_offered
        LIMIT %(limit)s
    ) o
)
SELECT id FROM offered
ORDER BY round, tenant <= %(after_tenant)s, tenant
LIMIT %(limit)s;

-- name: _shard_claim_offered
-- The shared start of the fair claim and of its read-only twin (shard_claim_candidates):
-- the tenants with queued work (_shard_claim_tenants), then "offered", each tenant's
-- claimable shards by priority, numbered per tenant ("round"). It ends inside the
-- per-tenant LATERAL subquery, after its ORDER BY: the includer writes that subquery's
-- LIMIT (a claim takes a share per tenant and locks with SKIP LOCKED, the candidates
-- take up to the limit and lock nothing) and closes it with ") o )".
-- include: _shard_claim_tenants
, offered AS (
    SELECT a.tenant, o.id, o.ctid,
           row_number() OVER (PARTITION BY a.tenant ORDER BY o.priority DESC, o.id) AS round
    FROM active a
    CROSS JOIN LATERAL (
        SELECT q.id, q.ctid, q.priority FROM pgbatch.shards q
        WHERE q.status = 'queued'
          AND q.queue = %(queue)s
          AND q.tenant = a.tenant
          AND q.task = ANY(%(tasks)s::text[])
          AND q.run_after <= now()
        ORDER BY q.priority DESC, q.id

-- name: _shard_claim_tenants
-- The start of a fair claim: the tenants with queued shards in this queue, found by a
-- loose index scan on shards_tenant_claim_idx (one probe per tenant, whatever the number
-- of shards), and how many they are. A paused queue (pgbatch.queue_pauses) has none: the
-- first probe finds nothing, so the claim takes nothing (an uncorrelated check, run once).
tenants AS (
    (SELECT t.tenant FROM pgbatch.shards t
     WHERE t.status = 'queued' AND t.queue = %(queue)s
       AND NOT EXISTS (SELECT 1 FROM pgbatch.queue_pauses p WHERE p.queue = %(queue)s)
     ORDER BY t.tenant LIMIT 1)
    UNION ALL
    SELECT (SELECT t.tenant FROM pgbatch.shards t
            WHERE t.status = 'queued' AND t.queue = %(queue)s AND t.tenant > r.tenant
            ORDER BY t.tenant LIMIT 1)
    FROM tenants r
    WHERE r.tenant IS NOT NULL
), active AS (
    SELECT tenant, count(*) OVER () AS n FROM tenants WHERE tenant IS NOT NULL
)

-- name: _shard_claim_answer
-- The end of every claim, after its CTE "picked" (the ctids of the shards to claim, as
-- locked). Each claimed shard comes back as one row carrying its items as one JSON array
-- text, its item block as stored (one parse per shard, no row per item); a retried shard
-- runs only the items whose result is being retried (their error rows are marked
-- retrying), so it also returns their seqs.
--
-- Every part is linear in the shards claimed, whatever the statistics and whether the plan
-- is generic (issue 13, tests/integration/test_claim_plan.py). The UPDATE finds its rows by
-- ctid, a TID scan: joined by id, a generic plan on fresh statistics hash-joined the picked
-- shards to a sequential scan of the whole table, every claim. A row locked here cannot
-- move before the UPDATE (the lock is this statement's); a row that a concurrent update
-- moved before it was locked is locked at its new version, which this statement's snapshot
-- does not see, so the UPDATE skips it and it stays queued: one winner still.
claimed AS (
    UPDATE pgbatch.shards s
    SET status = 'running',
        lease_epoch = s.lease_epoch + 1,
        attempts = s.attempts + 1,
        lease_expires_at = now() + s.lease_ttl_s * interval '1 second',
        worker_id = %(worker_id)s
    WHERE s.ctid = ANY(ARRAY(SELECT ctid FROM picked))
    RETURNING s.id, s.batch_id, s.task, s.first_seq, s.last_seq, s.lease_epoch, s.attempts,
              s.max_attempts, s.lease_ttl_s, s.retried, s.tenant, s.lease_refunds
), pending AS (
    -- The first claim of a pending batch starts it, so it shows "running" while its first
    -- shards run. Later claims find it running and lock nothing; rows in id order, as the
    -- completer locks them (invariant 6). SKIP LOCKED: this claim already holds queued
    -- shards of the batch, and cancel and set_priority lock the batch row first, then
    -- its queued shards; waiting here closed that cycle (a deadlock, one side aborted
    -- after deadlock_timeout, tests/integration/test_attack_hot_claim.py). A batch row
    -- locked now is started by a later claim or by its first completion's counters.
    SELECT b.id FROM pgbatch.batches b
    WHERE b.id IN (SELECT batch_id FROM claimed) AND b.status = 'pending'
    ORDER BY b.id
    FOR NO KEY UPDATE SKIP LOCKED
), started AS (
    UPDATE pgbatch.batches b
    SET status = 'running', started_at = coalesce(b.started_at, now()), version = b.version + 1
    FROM pending p
    WHERE b.id = p.id AND b.status = 'pending'
    RETURNING pg_notify('pgbatch_progress', b.id::text)
), batch AS (
    -- Once per batch claimed from, not per shard; an array probe, as for the shards.
    SELECT b.id, b.status = 'cancelled' AS cancelled FROM pgbatch.batches b
    WHERE b.id = ANY(ARRAY(SELECT DISTINCT batch_id FROM claimed))
)
SELECT c.id, c.batch_id, c.task, c.lease_epoch, c.attempts, c.max_attempts, c.lease_ttl_s,
       b.cancelled AS batch_cancelled, c.first_seq,
       CASE WHEN c.retried THEN ARRAY(
           SELECT e.seq FROM pgbatch.result_errors e
           WHERE e.batch_id = c.batch_id AND e.seq BETWEEN c.first_seq AND c.last_seq
             AND e.retrying
           ORDER BY e.seq) END AS seqs,
       ib.payloads,
       (SELECT count(*) FROM started) AS batches_started, c.tenant, c.lease_refunds
FROM claimed c
JOIN batch b ON b.id = c.batch_id
-- Each claimed shard probes its item block by primary key: as a plain join, fresh
-- statistics made the claim hash-join a sequential scan of every retained item block,
-- O(history) per claim. A LATERAL with LIMIT cannot be flattened into such a join.
LEFT JOIN LATERAL (
    SELECT ib.payloads::text AS payloads FROM pgbatch.item_blocks ib
    WHERE ib.batch_id = c.batch_id AND ib.first_seq = c.first_seq
    LIMIT 1
) ib ON true
ORDER BY c.id;

-- name: shard_bury_lock_batch
-- Before a bury, its batch row, locked first as cancel and retry lock it: the bury then
-- locks a queued shard with SKIP LOCKED and never waits for it. Locking the shard first
-- and the batch row last (as a completion does with its running shards) deadlocked with a
-- cancel, which holds the batch row and waits for the batch's queued shards.
SELECT b.id FROM pgbatch.batches b
WHERE b.id = (SELECT s.batch_id FROM pgbatch.shards s WHERE s.id = %(shard_id)s)
FOR NO KEY UPDATE;

-- name: shard_bury
-- A shard no claim can read is dead at once, with the claim's error, without reading its
-- items: fenced on "still queued" (a shard another worker claimed meanwhile is not touched)
-- and locked with SKIP LOCKED like a claim. Each item without a result gets the error as
-- its result (invariant 4): a first-run shard a block of nulls and an error row per item,
-- a retried one its retrying rows turned into the error. The caller counts the shard once
-- with batch_add_progress in the same transaction. Returns the batch and how many items
-- failed.
WITH buried AS (
    UPDATE pgbatch.shards s
    SET status = 'dead', last_error = %(error)s, last_error_at = now(), finished_at = now(),
        lease_epoch = s.lease_epoch + 1, attempts = s.attempts + 1,
        lease_expires_at = NULL, worker_id = NULL
    WHERE s.id = (SELECT q.id FROM pgbatch.shards q
                  WHERE q.id = %(shard_id)s AND q.status = 'queued'
                  FOR UPDATE SKIP LOCKED)
    RETURNING s.id, s.batch_id, s.first_seq, s.last_seq, s.retried
), block AS (
    INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)
    SELECT b.batch_id, b.first_seq,
           ('[' || rtrim(repeat('null,', (b.last_seq - b.first_seq + 1)::int), ',') || ']')::json
    FROM buried b
    ON CONFLICT (batch_id, first_seq) DO NOTHING
), failed AS (
    -- Seqs of a shard are its contiguous range: no need to read the items at all.
    INSERT INTO pgbatch.result_errors (batch_id, seq, error)
    SELECT b.batch_id, g, %(error)s
    FROM buried b, generate_series(b.first_seq, b.last_seq) AS g
    WHERE NOT b.retried
    ORDER BY g
    ON CONFLICT (batch_id, seq) DO NOTHING
    RETURNING 1
), refailed AS (
    UPDATE pgbatch.result_errors e
    SET error = %(error)s, traceback_digest = NULL, retrying = false
    FROM buried b
    WHERE b.retried AND e.batch_id = b.batch_id
      AND e.seq BETWEEN b.first_seq AND b.last_seq AND e.retrying
    RETURNING 1
)
SELECT b.batch_id, (SELECT count(*) FROM failed) + (SELECT count(*) FROM refailed) AS items_failed
FROM buried b;

-- name: shard_heartbeat_many
-- Renews the leases this worker still holds, fenced by epoch, and says of each shard
-- 'renewed', 'busy' or 'lost'. SKIP LOCKED: a heartbeat never waits on a row lock (its own
-- completion flush, stuck behind a frozen session, may hold the row); such a shard is
-- 'busy', still running under this epoch in the statement's snapshot, and not lost: the
-- flush renews it when it retries. 'lost': no longer running under this epoch (taken
-- over, or already finished: a shard done without failed items has no row any more).
-- Rows are locked in id order (invariant 6).
WITH lease AS (
    SELECT * FROM unnest(%(ids)s::bigint[], %(epochs)s::int[]) AS v(id, epoch)
), locked AS (
    SELECT s.id FROM pgbatch.shards s JOIN lease v ON v.id = s.id
    WHERE s.status = 'running' AND s.lease_epoch = v.epoch
    ORDER BY s.id
    FOR NO KEY UPDATE OF s SKIP LOCKED
), renewed AS (
    UPDATE pgbatch.shards s
    SET lease_expires_at = now() + s.lease_ttl_s * interval '1 second'
    FROM locked l
    WHERE s.id = l.id
    RETURNING s.id
)
SELECT v.id,
       CASE WHEN r.id IS NOT NULL THEN 'renewed'
            WHEN s.id IS NOT NULL THEN 'busy'
            ELSE 'lost' END AS state,
       coalesce(b.status = 'cancelled', false) AS cancelled
FROM lease v
LEFT JOIN renewed r ON r.id = v.id
LEFT JOIN pgbatch.shards s ON s.id = v.id AND s.status = 'running' AND s.lease_epoch = v.epoch
LEFT JOIN pgbatch.batches b ON b.id = s.batch_id
ORDER BY v.id;

-- name: shard_rescue_expired
-- Expired leases go back to the queue; the next claim bumps the epoch, which fences out
-- the worker that let the lease lapse. SKIP LOCKED: a shard being completed is not expired.
-- A lease lapses when its worker lost the database, froze or died: not the handler's
-- failure, so the attempt is refunded, at most %(free_reruns)s times per shard (then it
-- counts, and a shard that kills every worker that runs it still dies). `attempts` still
-- counts every run (a handler's ctx.attempt); what counts against max_attempts is
-- attempts - lease_refunds.
WITH expired AS (
    SELECT id, lease_refunds < %(free_reruns)s AS refund FROM pgbatch.shards
    WHERE status = 'running' AND lease_expires_at < now()
    ORDER BY id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), rescued AS (
    UPDATE pgbatch.shards s
    SET status = 'queued', run_after = now(), worker_id = NULL, lease_expires_at = NULL,
        last_error = 'lease expired', last_traceback = NULL, last_error_at = now(),
        lease_refunds = s.lease_refunds + e.refund::int
    FROM expired e
    WHERE s.id = e.id
    RETURNING s.queue, e.refund AS refunded
), counted AS (
    -- For the lease-takeover and refund metrics; written only when something expired.
    INSERT INTO pgbatch.counters AS c (name, value)
    SELECT name, n FROM (
        SELECT 'lease_takeovers' AS name, count(*) AS n FROM rescued
        UNION ALL
        SELECT 'lease_refunds', count(*) FILTER (WHERE refunded) FROM rescued
    ) t
    WHERE n > 0
    ORDER BY name
    ON CONFLICT (name) DO UPDATE SET value = c.value + excluded.value
)
SELECT queue, refunded FROM rescued;

-- name: shard_release
-- A draining worker gives an unfinished shard back at once; the attempt is not counted.
UPDATE pgbatch.shards s
SET status = 'queued', run_after = now(), attempts = greatest(s.attempts - 1, 0),
    lease_expires_at = NULL, worker_id = NULL
FROM unnest(%(ids)s::bigint[], %(epochs)s::int[]) AS v(id, epoch)
WHERE s.id = v.id AND s.status = 'running' AND s.lease_epoch = v.epoch
RETURNING s.id, s.queue;

-- name: shard_complete_many
-- Every state change of a running shard but the release on shutdown (invariant 2): done,
-- dead and cancelled shards, and failed attempts sent back to the queue ('queued', after
-- their backoff). A shard changes only while still running under the epoch the worker
-- claimed; the (id, epoch) pairs that come back are the changes that count. Rows are
-- locked in id order (invariant 6). A requeued shard keeps its attempts (the claim counted
-- the run; lease_refunds, not this statement, gives attempts back) and gets no
-- finished_at; a finished one keeps its worker_id, for people reading the table.
--
-- A shard that ends done with no failed item (%(failed)s false) is deleted, not updated:
-- nothing reads it again (its batch counts it, its result block holds its outputs, a retry
-- of the batch has nothing to rerun in it), so the table holds claimable, running and
-- unfinished-business shards only, not the history (docs/design/storage-layout.md). Dead,
-- cancelled and done-with-failures shards keep their row, updated as before: the retry of
-- failed items, the dead-shard samples and the tracebacks read them. The delete and the
-- update are two data-modifying CTEs over the same locked rows, disjoint by "gone", with
-- the same RETURNING: a zombie's late completion of a deleted shard finds no row to lock
-- and counts nothing, as it finds a row under another epoch when the shard still exists.
--
-- Its shape keeps every plan linear in the flush, generic or custom (issue 13): the array
-- drives, and each outcome probes its own shard by primary key in a LATERAL subquery that
-- locks it. The subquery's LIMIT keeps the planner from flattening it into a join it could
-- reorder: a generic plan estimating 1 running shard and 10 outcomes (statistics from
-- before the batch ran) once put the running shards outside and rescanned the outcomes
-- for each, 500 x 500 rows per flush of 500. So rows are locked in the array's order,
-- which complete_shards sorts by id (invariant 6). The running/epoch test is applied to
-- the row as locked (the latest version), outside the subquery, so no partial index on
-- status can stand in for the primary key; and inside it, as one CASE expression no
-- partial index predicate matches (a plain "status = 'running'" there made the generic
-- plan after a VACUUM scan the running shards, test_vacuum_plans.py), so a zombie's
-- outcome does not lock a shard that is no longer its own: rescued and queued again, such
-- a row is what a cancel of the batch (batch row first, then queued shards) waits for
-- while this flush waits for the batch row, a deadlock (test_attack_hot_zombie_cancel.py).
-- The DELETE and the UPDATE then join "locked" to shards by primary key alone. FOR UPDATE,
-- not FOR NO KEY UPDATE: a row may be deleted, and taking the delete's lock at once leaves
-- no lock to upgrade later.
WITH locked AS (
    SELECT v.id, v.epoch, v.status, v.error, v.delay_s, v.traceback,
           v.status = 'done' AND NOT v.failed AS gone
    FROM unnest(%(ids)s::bigint[], %(epochs)s::int[], %(statuses)s::text[],
                %(errors)s::text[], %(delays_s)s::float8[], %(tracebacks)s::text[],
                %(failed)s::boolean[])
        AS v(id, epoch, status, error, delay_s, traceback, failed)
    CROSS JOIN LATERAL (
        SELECT s.status, s.lease_epoch FROM pgbatch.shards s
        WHERE s.id = v.id AND CASE WHEN s.status = 'running' THEN s.lease_epoch END = v.epoch
        LIMIT 1
        FOR UPDATE OF s
    ) s
    WHERE s.status = 'running' AND s.lease_epoch = v.epoch
), deleted AS (
    DELETE FROM pgbatch.shards s
    USING locked l
    WHERE s.id = l.id AND s.lease_epoch = l.epoch AND l.gone
    RETURNING s.id, s.lease_epoch, s.retried, s.first_seq, s.last_seq
), updated AS (
    UPDATE pgbatch.shards s
    SET status = l.status, last_error = l.error, lease_expires_at = NULL,
        last_traceback = l.traceback,
        last_error_at = CASE WHEN l.error IS NULL THEN NULL ELSE now() END,
        finished_at = CASE WHEN l.status = 'queued' THEN NULL ELSE now() END,
        run_after = CASE WHEN l.status = 'queued'
                         THEN now() + l.delay_s * interval '1 second' ELSE s.run_after END,
        worker_id = CASE WHEN l.status = 'queued' THEN NULL ELSE s.worker_id END
    FROM locked l
    WHERE s.id = l.id AND s.lease_epoch = l.epoch AND NOT l.gone
    RETURNING s.id, s.lease_epoch, s.retried, s.first_seq, s.last_seq
)
-- A retried shard's results merge into its result block (result_block_merge).
SELECT id, lease_epoch, retried, first_seq, last_seq FROM deleted
UNION ALL
SELECT id, lease_epoch, retried, first_seq, last_seq FROM updated;

-- name: shard_snooze_refund
-- Runs in the completion flush that requeued a snoozed shard (pgbatch.Snooze), only if
-- the fence accepted it: the shard is queued under the epoch it was claimed with, and the
-- attempt its claim counted is given back (the handler chose not to run, as on a release).
UPDATE pgbatch.shards
SET attempts = greatest(attempts - 1, 0)
WHERE id = %(shard_id)s AND lease_epoch = %(epoch)s AND status = 'queued';
