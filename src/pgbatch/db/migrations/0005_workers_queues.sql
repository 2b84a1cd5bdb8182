-- Workers and queues you can see (issue 12 §2).
--
-- The live registry of worker processes: one row per running worker, upserted by its
-- heartbeat (at most every PGBATCH_WORKER_BEAT_S), deleted when it stops cleanly. A row
-- whose heartbeat is older than its own ttl_s belongs to a worker that died or froze:
-- readers show it as expired and never count it as serving anything; the next beat of
-- any worker deletes it once it is silent past gc_after_s.
CREATE TABLE pgbatch.workers (
    id           text             PRIMARY KEY,
    host         text             NOT NULL,
    pid          integer          NOT NULL,
    queues       text[]           NOT NULL,
    tasks        text[]           NOT NULL,
    concurrency  integer          NOT NULL,
    slots_in_use integer          NOT NULL DEFAULT 0,
    version      text             NOT NULL,
    ttl_s        double precision NOT NULL CHECK (ttl_s > 0),
    gc_after_s   double precision NOT NULL CHECK (gc_after_s > 0),
    started_at   timestamptz      NOT NULL DEFAULT now(),
    heartbeat_at timestamptz      NOT NULL DEFAULT now()
);

-- A paused queue: every claim skips it (its running shards still finish and complete).
-- A row means paused; resuming deletes it. In the database, so every worker on every
-- machine obeys it at its next claim.
CREATE TABLE pgbatch.queue_pauses (
    queue     text        PRIMARY KEY,
    paused_by text        NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- Queue depth and the age of the oldest claimable shard per queue (API, dashboard,
-- /metrics), per tenant or for all: an index-only scan of the queued shards, never of the
-- shard history. run_after is when a shard became claimable (submit, retry, rescue).
CREATE INDEX shards_queued_wait_idx ON pgbatch.shards (tenant, queue, run_after)
    WHERE status = 'queued';
