-- The whole current pgbatch schema: what applying every migration in order produces.
-- tests/integration/test_schema.py proves the two agree.

CREATE SCHEMA IF NOT EXISTS pgbatch;

-- Written by the migration runner, not by a migration: it records what has been applied.
CREATE TABLE pgbatch.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pgbatch.workload_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);

CREATE TABLE pgbatch.batches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- The owner of the API token that submitted it; 'default' for library and CLI use.
    tenant          text        NOT NULL DEFAULT 'default',
    task            text        NOT NULL,
    queue           text        NOT NULL DEFAULT 'default',
    priority        integer     NOT NULL DEFAULT 0,
    status          text        NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'running', 'succeeded', 'failed', 'cancelled')),
    shard_size      integer     NOT NULL CHECK (shard_size > 0),
    max_attempts    integer     NOT NULL CHECK (max_attempts > 0),
    lease_ttl_s     double precision NOT NULL CHECK (lease_ttl_s > 0),
    total_items     bigint      NOT NULL DEFAULT 0,
    total_shards    integer     NOT NULL DEFAULT 0,
    shards_done     integer     NOT NULL DEFAULT 0,
    shards_dead     integer     NOT NULL DEFAULT 0,
    items_ok        bigint      NOT NULL DEFAULT 0,
    items_failed    bigint      NOT NULL DEFAULT 0,
    run_no          integer     NOT NULL DEFAULT 1,
    on_complete     text,
    idempotency_key text,
    payload_hash    bytea,
    version         integer     NOT NULL DEFAULT 1,
    created_at      timestamptz NOT NULL DEFAULT now(),
    started_at      timestamptz,
    finished_at     timestamptz,
    -- A person's label and free-form string pairs (issue 12 §2), set at submit.
    name            text,
    metadata        jsonb       NOT NULL DEFAULT '{}',
    -- Items ended by a cancellation, apart from items_failed (issue 12 §3).
    items_cancelled bigint      NOT NULL DEFAULT 0,
    -- Seconds after finished_at until the batch is pruned; NULL keeps it (0008).
    retention_s     double precision CONSTRAINT batches_retention_s_check CHECK (retention_s >= 0),
    CHECK (shards_done <= total_shards),
    -- Per tenant: one tenant's keys can neither collide with nor reveal another's.
    CONSTRAINT batches_tenant_idempotency_key_key UNIQUE (tenant, idempotency_key)
);

CREATE INDEX batches_status_created_idx ON pgbatch.batches (status, created_at);
-- Listing a tenant's batches newest first, a page at a time (cursor = last id seen).
CREATE INDEX batches_tenant_id_idx ON pgbatch.batches (tenant, id DESC);
-- The list's filters by name (newest first) and by metadata pairs (containment).
CREATE INDEX batches_tenant_name_id_idx ON pgbatch.batches (tenant, name, id DESC)
    WHERE name IS NOT NULL;
CREATE INDEX batches_metadata_idx ON pgbatch.batches USING gin (metadata jsonb_path_ops);
-- The pruner's scan: finished batches that have a retention, oldest first.
CREATE INDEX batches_finished_retained_idx ON pgbatch.batches (finished_at)
    WHERE retention_s IS NOT NULL;

-- A pruned batch's tombstone: its id answers 410 with pruned_at, scoped to its tenant.
-- Its rows go in chunks after the batch row; cleaned_at is set once none is left.
CREATE TABLE pgbatch.pruned_batches (
    id          bigint      PRIMARY KEY,
    tenant      text        NOT NULL,
    task        text        NOT NULL,
    status      text        NOT NULL,
    total_items bigint      NOT NULL,
    finished_at timestamptz NOT NULL,
    pruned_at   timestamptz NOT NULL DEFAULT now(),
    cleaned_at  timestamptz
);
CREATE INDEX pruned_batches_unclean_idx ON pgbatch.pruned_batches (id) WHERE cleaned_at IS NULL;

-- Items and outputs are json, not jsonb: pgbatch never looks inside them, and json is
-- stored and returned as the text it was given, which COPY writes and the claim reads
-- back about twice as fast as jsonb's parse and re-serialisation.
-- No foreign key to batches on the blocks and errors: they are written only by pgbatch, in
-- the transactions that create the batch or hold its shard.
-- Items and results are stored one row per shard (0009, docs/design/storage-layout.md).
-- A shard's items, in seq order from first_seq (= shard_no * shard_size).
-- Vacuumed at 1 % of dead rows, not 20 % (0010): its dead rows are pruned batches' only,
-- and with a week of history the default would let a fifth of the table go dead first.
CREATE TABLE pgbatch.item_blocks (
    batch_id  bigint NOT NULL,
    first_seq bigint NOT NULL,
    payloads  json   NOT NULL,
    PRIMARY KEY (batch_id, first_seq)
) WITH (autovacuum_vacuum_scale_factor = 0.01);

-- The claimable, running and unfinished-business shards: a shard that ends done with no
-- failed item is deleted by its completion (0011, shard_complete_many); dead, cancelled
-- and done-with-failures shards stay until their batch is pruned, as do the done shards
-- an earlier release kept. Counts of finished shards come from the batch's counters.
CREATE TABLE pgbatch.shards (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- No foreign key (0008): a pruned batch's shards go after its row, in chunks.
    batch_id         bigint      NOT NULL,
    -- Its batch's tenant, copied so the claim can share a queue fairly between tenants.
    tenant           text        NOT NULL,
    shard_no         integer     NOT NULL,
    first_seq        bigint      NOT NULL,
    last_seq         bigint      NOT NULL,
    task             text        NOT NULL,
    queue            text        NOT NULL,
    priority         integer     NOT NULL,
    status           text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'done', 'dead', 'cancelled')),
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL,
    lease_ttl_s      double precision NOT NULL,
    lease_epoch      integer     NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    worker_id        text,
    retried          boolean     NOT NULL DEFAULT false,
    run_after        timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    finished_at      timestamptz,
    -- Expired leases requeued with their attempt refunded (at most lease_free_reruns).
    lease_refunds    integer     NOT NULL DEFAULT 0,
    -- The last failure's traceback, bounded (pgbatch/engine/failures.py), and when it happened.
    last_traceback   text,
    last_error_at    timestamptz,
    UNIQUE (batch_id, shard_no),
    CHECK (first_seq <= last_seq)
);

-- The claim reads only queued shards in priority order: a partial index keeps it small.
CREATE INDEX shards_claim_idx ON pgbatch.shards (queue, priority DESC, id) WHERE status = 'queued';
-- The fair claim's loose scan over a queue's tenants, then each tenant's shards by priority;
-- and queue depth and oldest claimable shard per queue and tenant (0012).
CREATE INDEX shards_tenant_claim_idx ON pgbatch.shards (queue, tenant, priority DESC, id)
    WHERE status = 'queued';
-- The lease rescuer reads only running shards by expiry.
CREATE INDEX shards_lease_idx ON pgbatch.shards (lease_expires_at) WHERE status = 'running';

-- A shard's results once it has ended: one position per item, its output if it succeeded.
CREATE TABLE pgbatch.result_blocks (
    batch_id  bigint NOT NULL,
    first_seq bigint NOT NULL,
    outputs   json   NOT NULL,
    -- When the shard ended (0011): a shard done without failed items leaves no row to say
    -- it; NULL for blocks written before 0011 (their shard rows say it) and for the
    -- blocks a cancel wrote (no work done).
    finished_at timestamptz DEFAULT now(),
    PRIMARY KEY (batch_id, first_seq)
);

-- A failed item's result; `retrying` while a retry of its batch runs it again (then the
-- item has no result). Failures are few: `?status=error` reads these rows alone.
CREATE TABLE pgbatch.result_errors (
    batch_id         bigint  NOT NULL,
    seq              bigint  NOT NULL,
    error            text    NOT NULL,
    traceback_digest bytea,
    retrying         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (batch_id, seq)
);

-- The blocks as one row per item, under the old names and columns (0009).
CREATE VIEW pgbatch.items AS
SELECT b.batch_id, b.first_seq + e.ord - 1 AS seq, e.payload
FROM pgbatch.item_blocks b
CROSS JOIN LATERAL json_array_elements(b.payloads) WITH ORDINALITY AS e(payload, ord);

CREATE VIEW pgbatch.results AS
SELECT b.batch_id, b.first_seq + e.ord - 1 AS seq, er.seq IS NULL AS ok,
       CASE WHEN er.seq IS NULL AND json_typeof(e.output) <> 'null' THEN e.output END
           AS output,
       er.error, er.traceback_digest
FROM pgbatch.result_blocks b
CROSS JOIN LATERAL json_array_elements(b.outputs) WITH ORDINALITY AS e(output, ord)
LEFT JOIN pgbatch.result_errors er
    ON er.batch_id = b.batch_id AND er.seq = b.first_seq + e.ord - 1
WHERE er.retrying IS NOT TRUE;

-- Distinct traceback texts of a batch, shared by the failed items that raised them.
CREATE TABLE pgbatch.tracebacks (
    batch_id  bigint NOT NULL,
    digest    bytea  NOT NULL,
    traceback text   NOT NULL,
    PRIMARY KEY (batch_id, digest)
);

-- The completion callback outbox: one row per batch run, so it is inserted exactly once.
CREATE TABLE pgbatch.callbacks (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id         bigint      NOT NULL REFERENCES pgbatch.batches (id) ON DELETE CASCADE,
    run_no           integer     NOT NULL,
    name             text        NOT NULL,
    -- How the run ended, fixed when the callback was queued: the batch may be retried
    -- and end differently before the callback runs.
    batch_status     text        NOT NULL,
    status           text        NOT NULL DEFAULT 'queued'
        CHECK (status IN ('queued', 'running', 'done', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    lease_epoch      integer     NOT NULL DEFAULT 0,
    lease_expires_at timestamptz,
    run_after        timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (batch_id, run_no)
);

CREATE INDEX callbacks_claim_idx ON pgbatch.callbacks (id) WHERE status = 'queued';
CREATE INDEX callbacks_lease_idx ON pgbatch.callbacks (lease_expires_at) WHERE status = 'running';

-- Running totals the metrics endpoint reads (lease takeovers, so far). A row per name,
-- written only when the counted event happens, which is rare: no hot row.
CREATE TABLE pgbatch.counters (
    name  text   PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0
);

-- The live registry of worker processes (0005): upserted by each worker's heartbeat,
-- deleted on a clean stop; a row silent past its ttl_s is expired, past gc_after_s gone.
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

-- A paused queue (0005): claims skip it; running shards still finish.
CREATE TABLE pgbatch.queue_pauses (
    queue     text        PRIMARY KEY,
    paused_by text        NOT NULL,
    paused_at timestamptz NOT NULL DEFAULT now()
);

-- ---------------------------------------------------------------------------------------
-- Workloads that ship with pgbatch: their tables, as their own migrations make them
-- (recorded in pgbatch.workload_migrations), when an app uses the workload.

-- collections (pgbatch/workloads/collections/migrations)
CREATE TABLE pgbatch.collections (
    tenant     text COLLATE "C" NOT NULL,
    id         text COLLATE "C" NOT NULL,
    name       text,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, id)
);
CREATE TABLE pgbatch.collection_items (
    tenant        text COLLATE "C" NOT NULL,
    collection_id text COLLATE "C" NOT NULL,
    item_id       text COLLATE "C" NOT NULL,
    PRIMARY KEY (tenant, collection_id, item_id)
);
CREATE TABLE pgbatch.collection_copy_stats (
    batch_id        bigint NOT NULL,
    shard_id        bigint NOT NULL,
    inserted        bigint NOT NULL,
    already_present bigint NOT NULL,
    not_in_source   bigint NOT NULL,
    PRIMARY KEY (batch_id, shard_id)
);

-- documents (pgbatch/workloads/documents/migrations; also its write functions)
CREATE TABLE pgbatch.documents (
    key        uuid        PRIMARY KEY,
    partition  text        NOT NULL,
    type       text        NOT NULL,
    identity   jsonb       NOT NULL,
    body       jsonb       NOT NULL CONSTRAINT documents_body_is_object
                               CHECK (jsonb_typeof(body) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE pgbatch.document_references (
    parent uuid NOT NULL REFERENCES pgbatch.documents (key) ON DELETE CASCADE,
    target uuid NOT NULL REFERENCES pgbatch.documents (key),
    PRIMARY KEY (parent, target)
);
CREATE INDEX document_references_target_idx ON pgbatch.document_references (target);

-- llm (pgbatch/workloads/llm/migrations; also its reserve function)
-- One row per shared limit (an upstream key, or a key and model): what the deployment
-- configured (every worker writes its configuration when it reserves) and whether a 429
-- paused it for everyone.
CREATE TABLE pgbatch.llm_limits (
    name          text        PRIMARY KEY,
    rpm           integer     CHECK (rpm > 0),
    tpm           integer     CHECK (tpm > 0),
    max_in_flight integer     CHECK (max_in_flight > 0),
    paused_until  timestamptz,
    -- 429s that paused the key (each one a request the upstream refused)
    pauses        bigint      NOT NULL DEFAULT 0
);

-- A shard's worth of requests charged to a limit: reserved before the calls, settled to
-- what the answers used in the shard's fenced completion. A row counts in the sliding
-- minute from window_at (the settle moves it to the commit, after the last send); an
-- unsettled row counts in flight only while its shard runs under the epoch that reserved
-- it, so a crashed worker's in-flight share comes back when its lease is taken over.
CREATE TABLE pgbatch.llm_reservations (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL,
    shard_id    bigint      NOT NULL,
    lease_epoch integer     NOT NULL,
    requests    integer     NOT NULL CHECK (requests >= 0),
    tokens      bigint      NOT NULL CHECK (tokens >= 0),
    window_at   timestamptz NOT NULL DEFAULT now(),
    settled     boolean     NOT NULL DEFAULT false
);
CREATE INDEX llm_reservations_window_idx ON pgbatch.llm_reservations (name, window_at);

-- Reserve the longest prefix of a shard's requests (their estimated tokens in order) that
-- the limit allows now, in one call: the row lock of the limit serialises reservers of one
-- key on every machine; each statement below takes a fresh snapshot (READ COMMITTED), so
-- it sees the reservation committed by the reserver it waited for.
CREATE FUNCTION pgbatch.llm_reserve(
    p_name text, p_rpm integer, p_tpm integer, p_max_in_flight integer,
    p_shard_id bigint, p_epoch integer, p_tokens integer[], p_window_s double precision,
    p_settle_ids bigint[], p_settle_requests integer[], p_settle_tokens bigint[]
) RETURNS TABLE (granted integer, granted_tokens bigint, reservation_id bigint,
                 wait_s double precision)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    lim            pgbatch.llm_limits;
    used_requests  bigint;
    used_tokens    bigint;
    oldest         timestamptz;
    flying         bigint := 0;
    n              integer := 0;
    total          bigint := 0;
    t              integer;
    blocked_by_flight boolean := false;
    rid            bigint;
BEGIN
    INSERT INTO pgbatch.llm_limits AS l (name, rpm, tpm, max_in_flight)
    VALUES (p_name, p_rpm, p_tpm, p_max_in_flight)
    ON CONFLICT (name) DO UPDATE
        SET rpm = excluded.rpm, tpm = excluded.tpm, max_in_flight = excluded.max_in_flight
    RETURNING * INTO lim;
    -- The shard's previous round is over: settle it here, so it stops counting in flight
    -- (its last round is settled by its completion).
    UPDATE pgbatch.llm_reservations r
    SET requests = v.requests, tokens = v.tokens, settled = true,
        window_at = greatest(r.window_at, now())
    FROM unnest(p_settle_ids, p_settle_requests, p_settle_tokens) AS v(id, requests, tokens)
    WHERE r.id = v.id;
    IF lim.paused_until IS NOT NULL AND lim.paused_until > clock_timestamp() THEN
        RETURN QUERY SELECT 0, 0::bigint, NULL::bigint,
            extract(epoch FROM lim.paused_until - clock_timestamp())::double precision;
        RETURN;
    END IF;
    -- Rows past the window that no live lease holds unsettled are history: drop them.
    DELETE FROM pgbatch.llm_reservations r
    WHERE r.name = p_name AND r.window_at < now() - p_window_s * interval '1 second'
      AND (r.settled OR NOT EXISTS (
          SELECT 1 FROM pgbatch.shards s
          WHERE s.id = r.shard_id AND s.lease_epoch = r.lease_epoch AND s.status = 'running'));
    SELECT coalesce(sum(r.requests), 0), coalesce(sum(r.tokens), 0), min(r.window_at)
    INTO used_requests, used_tokens, oldest
    FROM pgbatch.llm_reservations r
    WHERE r.name = p_name;
    IF p_max_in_flight IS NOT NULL THEN
        SELECT coalesce(sum(r.requests), 0) INTO flying
        FROM pgbatch.llm_reservations r
        JOIN pgbatch.shards s
          ON s.id = r.shard_id AND s.lease_epoch = r.lease_epoch AND s.status = 'running'
        WHERE r.name = p_name AND NOT r.settled;
    END IF;
    FOREACH t IN ARRAY p_tokens LOOP
        EXIT WHEN p_rpm IS NOT NULL AND used_requests + n + 1 > p_rpm;
        EXIT WHEN p_tpm IS NOT NULL AND used_tokens + total + t > p_tpm;
        IF p_max_in_flight IS NOT NULL AND flying + n + 1 > p_max_in_flight THEN
            blocked_by_flight := true;
            EXIT;
        END IF;
        n := n + 1;
        total := total + t;
    END LOOP;
    IF n = 0 THEN
        -- Until the oldest charge leaves the window (or, for the in-flight bound, a
        -- shard's calls are likely back): the caller snoozes that long.
        RETURN QUERY SELECT 0, 0::bigint, NULL::bigint, CASE
            WHEN blocked_by_flight OR oldest IS NULL THEN 0.5
            ELSE greatest(0.05, extract(epoch FROM
                oldest + p_window_s * interval '1 second' - clock_timestamp()))::double precision
        END;
        RETURN;
    END IF;
    INSERT INTO pgbatch.llm_reservations (name, shard_id, lease_epoch, requests, tokens)
    VALUES (p_name, p_shard_id, p_epoch, n, total)
    RETURNING id INTO rid;
    RETURN QUERY SELECT n, total, rid, 0::double precision;
END
$$;

-- What each request used, written with its result in the shard's completion. Not keyed:
-- a retried batch reruns its failed requests, and each run's usage is a row.
CREATE TABLE pgbatch.llm_request_usage (
    -- No foreign key: retention deletes these rows in chunks (the workload's prune hook).
    batch_id          bigint  NOT NULL,
    seq               bigint  NOT NULL,
    model             text    NOT NULL,
    -- sends to the upstream (0 for a cache hit); 429s included
    attempts          integer NOT NULL,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    cached_tokens     integer NOT NULL,
    cache_hit         boolean NOT NULL
);
CREATE INDEX llm_request_usage_batch_idx ON pgbatch.llm_request_usage (batch_id, seq);

-- A batch's totals per model, added to once per shard in its fenced completion.
CREATE TABLE pgbatch.llm_batch_usage (
    batch_id          bigint NOT NULL REFERENCES pgbatch.batches (id) ON DELETE CASCADE,
    model             text   NOT NULL,
    requests          bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    upstream_calls    bigint NOT NULL DEFAULT 0,
    rate_limited      bigint NOT NULL DEFAULT 0,
    cache_hits        bigint NOT NULL DEFAULT 0,
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cached_tokens     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (batch_id, model)
);

-- Successful answers of batches that opted in, by the request's canonical key
-- (usage.cache_key), per tenant: one tenant cannot learn what another asked.
CREATE TABLE pgbatch.llm_cache (
    tenant     text        NOT NULL,
    key        bytea       NOT NULL,
    url        text        NOT NULL,
    response   jsonb       NOT NULL,
    request_id text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, key)
);
-- llm, the OpenAI Batch API's files and batches (pgbatch/workloads/llm/migrations/0002)
CREATE TABLE pgbatch.llm_files (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text        NOT NULL,
    filename   text        NOT NULL,
    purpose    text        NOT NULL,
    bytes      bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX llm_files_tenant_idx ON pgbatch.llm_files (tenant, id);

CREATE TABLE pgbatch.llm_file_chunks (
    file_id bigint NOT NULL REFERENCES pgbatch.llm_files (id) ON DELETE CASCADE,
    seq     int    NOT NULL,
    data    bytea  NOT NULL,
    PRIMARY KEY (file_id, seq)
);

CREATE TABLE pgbatch.llm_batches (
    id                bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant            text        NOT NULL,
    -- No foreign key: OpenAI lets a file be deleted while batches made from it live on
    -- (their requests are the pgbatch batch's items by then).
    input_file_id     bigint      NOT NULL,
    endpoint          text        NOT NULL,
    completion_window text        NOT NULL,
    metadata          jsonb,
    -- Only the states pgbatch's batch cannot tell: validating, failed (validation), and
    -- submitted (then the pgbatch batch's status is the OpenAI status).
    status            text        NOT NULL CONSTRAINT llm_batches_status_known
                          CHECK (status IN ('validating', 'failed', 'submitted')),
    errors            jsonb,
    -- Retention removes the pgbatch batch, and this row with it (its files are its results).
    batch_id          bigint      REFERENCES pgbatch.batches (id) ON DELETE CASCADE,
    request_total     bigint,
    -- The sizes of the output and error files, known once the batch has ended.
    output_bytes      bigint,
    error_bytes       bigint,
    created_at        timestamptz NOT NULL DEFAULT now(),
    in_progress_at    timestamptz,
    failed_at         timestamptz,
    cancelling_at     timestamptz,
    expired_at        timestamptz
);
CREATE INDEX llm_batches_tenant_idx ON pgbatch.llm_batches (tenant, id);
CREATE INDEX llm_batches_batch_idx ON pgbatch.llm_batches (batch_id);
-- vectors (pgbatch/workloads/vectors/migrations; also its index-commit functions). Each
-- library's chunks are a table of their own, pgbatch.vector_chunks_<id>, made with
-- pgvector when the library is created (workloads/vectors/sql/vectors.sql).
CREATE TABLE pgbatch.vector_libraries (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text COLLATE "C" NOT NULL,
    name       text NOT NULL,
    metadata   jsonb NOT NULL DEFAULT '{}' CONSTRAINT vector_libraries_metadata_is_object
                   CHECK (jsonb_typeof(metadata) = 'object'),
    embedder   text NOT NULL,
    dimension  integer NOT NULL CONSTRAINT vector_libraries_dimension_range
                   CHECK (dimension BETWEEN 1 AND 2000),
    version    bigint NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vector_libraries_tenant_name_key UNIQUE (tenant, name)
);
CREATE TABLE pgbatch.vector_documents (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    library_id      bigint NOT NULL REFERENCES pgbatch.vector_libraries (id) ON DELETE CASCADE,
    metadata        jsonb NOT NULL DEFAULT '{}' CONSTRAINT vector_documents_metadata_is_object
                        CHECK (jsonb_typeof(metadata) = 'object'),
    body            text,
    chunks          jsonb CONSTRAINT vector_documents_chunks_is_array
                        CHECK (chunks IS NULL OR jsonb_typeof(chunks) = 'array'),
    status          text NOT NULL DEFAULT 'pending' CONSTRAINT vector_documents_status_known
                        CHECK (status IN ('pending', 'indexing', 'indexed', 'failed', 'cancelled')),
    error           text,
    version         bigint NOT NULL DEFAULT 1,
    content_version bigint NOT NULL DEFAULT 1,
    indexed_version bigint,
    chunk_count     integer NOT NULL DEFAULT 0,
    batch_id        bigint,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT vector_documents_has_content CHECK (body IS NOT NULL OR chunks IS NOT NULL)
);
CREATE INDEX vector_documents_library_idx ON pgbatch.vector_documents (library_id, id);
CREATE INDEX vector_documents_batch_idx ON pgbatch.vector_documents (batch_id);
