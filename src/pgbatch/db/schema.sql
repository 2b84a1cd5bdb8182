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
    CHECK (shards_done <= total_shards),
    -- Per tenant: one tenant's keys can neither collide with nor reveal another's.
    CONSTRAINT batches_tenant_idempotency_key_key UNIQUE (tenant, idempotency_key)
);

CREATE INDEX batches_status_created_idx ON pgbatch.batches (status, created_at);
-- Listing a tenant's batches newest first, a page at a time (cursor = last id seen).
CREATE INDEX batches_tenant_id_idx ON pgbatch.batches (tenant, id DESC);

-- Items and outputs are json, not jsonb: pgbatch never looks inside them, and json is
-- stored and returned as the text it was given, which COPY writes and the claim reads
-- back about twice as fast as jsonb's parse and re-serialisation.
-- No foreign key to batches on items and results: they are written only by pgbatch, in
-- the transactions that create the batch or hold its shard, and a per-row RI check on
-- millions of COPY rows would cost more than the rest of the write.
CREATE TABLE pgbatch.items (
    batch_id bigint NOT NULL,
    seq      bigint NOT NULL,
    payload  json   NOT NULL,
    PRIMARY KEY (batch_id, seq)
);

CREATE TABLE pgbatch.shards (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    batch_id         bigint      NOT NULL REFERENCES pgbatch.batches (id) ON DELETE CASCADE,
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
    UNIQUE (batch_id, shard_no),
    CHECK (first_seq <= last_seq)
);

-- The claim reads only queued shards in priority order: a partial index keeps it small.
CREATE INDEX shards_claim_idx ON pgbatch.shards (queue, priority DESC, id) WHERE status = 'queued';
-- The fair claim's loose scan over a queue's tenants, then each tenant's shards by priority.
CREATE INDEX shards_tenant_claim_idx ON pgbatch.shards (queue, tenant, priority DESC, id)
    WHERE status = 'queued';
-- The lease rescuer reads only running shards by expiry.
CREATE INDEX shards_lease_idx ON pgbatch.shards (lease_expires_at) WHERE status = 'running';

CREATE TABLE pgbatch.results (
    batch_id bigint  NOT NULL,
    seq      bigint  NOT NULL,
    ok       boolean NOT NULL,
    output   json,
    error    text,
    PRIMARY KEY (batch_id, seq),
    CHECK (ok = (error IS NULL))
);

-- Failed items of a batch (`?status=error`, the dashboard's error samples) without
-- reading its successes: errors are few, so the index is small and cheap to maintain.
CREATE INDEX results_errors_idx ON pgbatch.results (batch_id, seq) WHERE NOT ok;

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
                        CHECK (status IN ('pending', 'indexing', 'indexed', 'failed')),
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
