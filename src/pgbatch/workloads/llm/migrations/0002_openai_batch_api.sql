-- The OpenAI Batch API's own state (issue 10, point 2): uploaded request files, stored in
-- chunks so neither an upload nor a read holds a file whole in memory, and the OpenAI
-- batches made from them. A batch's requests, results and counters are a pgbatch batch's
-- (`batch_id`); this table adds what OpenAI's batch object has and pgbatch's has not.
CREATE TABLE IF NOT EXISTS pgbatch.llm_files (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant     text        NOT NULL,
    filename   text        NOT NULL,
    purpose    text        NOT NULL,
    bytes      bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
-- GET /files lists a tenant's files newest first, paged by id.
CREATE INDEX IF NOT EXISTS llm_files_tenant_idx ON pgbatch.llm_files (tenant, id);

CREATE TABLE IF NOT EXISTS pgbatch.llm_file_chunks (
    file_id bigint NOT NULL REFERENCES pgbatch.llm_files (id) ON DELETE CASCADE,
    seq     int    NOT NULL,
    data    bytea  NOT NULL,
    PRIMARY KEY (file_id, seq)
);

CREATE TABLE IF NOT EXISTS pgbatch.llm_batches (
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
CREATE INDEX IF NOT EXISTS llm_batches_tenant_idx ON pgbatch.llm_batches (tenant, id);
CREATE INDEX IF NOT EXISTS llm_batches_batch_idx ON pgbatch.llm_batches (batch_id);
