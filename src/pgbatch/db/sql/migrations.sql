-- name: migration_table_exists
SELECT to_regclass('pgbatch.schema_migrations') IS NOT NULL;

-- name: migration_applied_versions
SELECT version FROM pgbatch.schema_migrations;

-- name: migration_lock
-- Transaction-scoped: released by the commit or rollback, even if this process dies.
SELECT pg_advisory_xact_lock(%(key)s);

-- name: migration_bootstrap
CREATE SCHEMA IF NOT EXISTS pgbatch;
CREATE TABLE IF NOT EXISTS pgbatch.schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- A workload's migrations, each workload with its own version sequence.
CREATE TABLE IF NOT EXISTS pgbatch.workload_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
);

-- name: workload_migration_table_exists
SELECT to_regclass('pgbatch.workload_migrations') IS NOT NULL;

-- name: workload_migration_applied_versions
SELECT version FROM pgbatch.workload_migrations WHERE component = %(component)s;

-- name: workload_migration_record
INSERT INTO pgbatch.workload_migrations (component, version, name)
VALUES (%(component)s, %(version)s, %(name)s);

-- name: migration_record
INSERT INTO pgbatch.schema_migrations (version, name) VALUES (%(version)s, %(name)s);

-- name: migration_wait_for_locks
-- For this transaction only: the session's lock_timeout applies again after it.
SET LOCAL lock_timeout = 0;
