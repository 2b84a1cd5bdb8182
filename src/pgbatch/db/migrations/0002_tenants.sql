-- Tenants (issue 4): every batch belongs to one tenant, the owner of the API token that
-- submitted it; library and CLI callers use 'default'. An idempotency key is unique per
-- tenant, so one tenant's keys can neither collide with nor reveal another's.
ALTER TABLE pgbatch.batches ADD COLUMN tenant text NOT NULL DEFAULT 'default';

ALTER TABLE pgbatch.batches DROP CONSTRAINT batches_idempotency_key_key;
ALTER TABLE pgbatch.batches
    ADD CONSTRAINT batches_tenant_idempotency_key_key UNIQUE (tenant, idempotency_key);

-- Listing a tenant's batches newest first, a page at a time (cursor = last id seen).
CREATE INDEX batches_tenant_id_idx ON pgbatch.batches (tenant, id DESC);

-- Running totals the metrics endpoint reads (lease takeovers, so far). A row per name,
-- written only when the counted event happens, which is rare: no hot row.
CREATE TABLE pgbatch.counters (
    name  text   PRIMARY KEY,
    value bigint NOT NULL DEFAULT 0
);

-- Failed items of a batch (`?status=error`, the dashboard's error samples) without
-- reading its successes: errors are few, so the index is small and cheap to maintain.
CREATE INDEX results_errors_idx ON pgbatch.results (batch_id, seq) WHERE NOT ok;
