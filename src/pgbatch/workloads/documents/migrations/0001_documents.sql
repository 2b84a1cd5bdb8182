-- The document-ingest workload's tables and write functions, in pgbatch's schema (names
-- a user's own `documents` table cannot collide with).
--
-- Before workload migrations (pgbatch at dbe590b) they were created at run time in the
-- schema first on the search path. Such tables move here with their rows, and the old
-- functions, which name the tables unqualified, are dropped: a table is taken for
-- pgbatch's when documents and document_references both exist with pgbatch's columns.
DO $move$
DECLARE
    old_schema text;
BEGIN
    IF to_regclass('pgbatch.documents') IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT n.nspname INTO old_schema
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.oid = to_regclass('documents');
    IF old_schema IS NULL OR to_regclass(format('%I.document_references', old_schema)) IS NULL
       OR (SELECT count(*) FROM pg_attribute
           WHERE attrelid = format('%I.documents', old_schema)::regclass
             AND attname IN ('key', 'partition', 'type', 'identity', 'body')
             AND NOT attisdropped) < 5
       OR (SELECT count(*) FROM pg_attribute
           WHERE attrelid = format('%I.document_references', old_schema)::regclass
             AND attname IN ('parent', 'target') AND NOT attisdropped) < 2 THEN
        RETURN;
    END IF;
    EXECUTE format('ALTER TABLE %I.documents SET SCHEMA pgbatch', old_schema);
    EXECUTE format('ALTER TABLE %I.document_references SET SCHEMA pgbatch', old_schema);
    EXECUTE format('DROP FUNCTION IF EXISTS %I.documents_write_flush(uuid[], text[], text[], '
                   'jsonb[], jsonb[], uuid[], uuid[])', old_schema);
    EXECUTE format('DROP FUNCTION IF EXISTS %I.documents_upsert(uuid[], text[], text[], '
                   'jsonb[], jsonb[])', old_schema);
    EXECUTE format('DROP FUNCTION IF EXISTS %I.documents_replace_references(uuid[], uuid[], '
                   'uuid[])', old_schema);
END
$move$;

-- The table of references is not called "references" (a reserved word).
-- Its foreign keys make "every reference points at a document" a fact of the database:
-- the writer inserts all documents of a flush before their references, so references
-- inside one flush, cycles included, pass the immediate checks.
CREATE TABLE IF NOT EXISTS pgbatch.documents (
    key        uuid        PRIMARY KEY,
    partition  text        NOT NULL,
    type       text        NOT NULL,
    identity   jsonb       NOT NULL,
    body       jsonb       NOT NULL CONSTRAINT documents_body_is_object
                               CHECK (jsonb_typeof(body) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pgbatch.document_references (
    parent uuid NOT NULL REFERENCES pgbatch.documents (key) ON DELETE CASCADE,
    target uuid NOT NULL REFERENCES pgbatch.documents (key),
    PRIMARY KEY (parent, target)
);
-- "Who references this document?", and the foreign key's check when one is deleted.
CREATE INDEX IF NOT EXISTS document_references_target_idx ON pgbatch.document_references (target);

-- The writes of a flush, as functions: the fast path calls documents_write_flush (one
-- round trip, one implicit transaction); a flush that isolates a failing item calls the
-- two parts separately, each bisected inside savepoints. Why functions and not one
-- statement with data-modifying CTEs: every statement of a VOLATILE function takes a
-- fresh snapshot (READ COMMITTED), so when the upsert had to wait for a concurrent post
-- of the same key, the replacement of the references then sees that post's references
-- and removes the stale ones. The CTEs of one statement share the snapshot taken before
-- the wait, and would leave them behind.
CREATE OR REPLACE FUNCTION pgbatch.documents_upsert(
    flush_keys uuid[], flush_partitions text[], flush_types text[],
    flush_identities jsonb[], flush_bodies jsonb[]
) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    -- Re-posting an identity replaces its body; created_at keeps the first post's time.
    INSERT INTO pgbatch.documents AS d (key, partition, type, identity, body)
    SELECT u.key, u.partition, u.type, u.identity, u.body
    FROM unnest(flush_keys, flush_partitions, flush_types, flush_identities, flush_bodies)
        AS u(key, partition, type, identity, body)
    ORDER BY u.key
    ON CONFLICT (key) DO UPDATE
    SET partition  = EXCLUDED.partition,
        type       = EXCLUDED.type,
        identity   = EXCLUDED.identity,
        body       = EXCLUDED.body,
        updated_at = now();
END
$fn$;

CREATE OR REPLACE FUNCTION pgbatch.documents_replace_references(
    flush_parents uuid[], flush_ref_parents uuid[], flush_ref_targets uuid[]
) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    -- The references of the parents become exactly the (parent, target) pairs given:
    -- stale ones are deleted, new ones inserted. The two parts touch disjoint rows, so
    -- one statement does both.
    WITH wanted AS (
        SELECT w.parent, w.target
        FROM unnest(flush_ref_parents, flush_ref_targets) AS w(parent, target)
    ), stale AS (
        DELETE FROM pgbatch.document_references r
        WHERE r.parent = ANY(flush_parents)
          AND NOT EXISTS (
              SELECT 1 FROM wanted w WHERE w.parent = r.parent AND w.target = r.target)
    )
    INSERT INTO pgbatch.document_references (parent, target)
    SELECT w.parent, w.target FROM wanted w
    ORDER BY w.parent, w.target
    ON CONFLICT (parent, target) DO NOTHING;
END
$fn$;

-- The whole flush, unless a referenced key is neither a document nor one of the flush's
-- own keys: then it writes nothing and returns the referenced keys that are documents
-- (what the writer needs to decide which items to keep). NULL means written.
CREATE OR REPLACE FUNCTION pgbatch.documents_write_flush(
    flush_keys uuid[], flush_partitions text[], flush_types text[],
    flush_identities jsonb[], flush_bodies jsonb[],
    flush_ref_parents uuid[], flush_ref_targets uuid[]
) RETURNS uuid[]
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    found uuid[];
BEGIN
    -- `key = ANY(array)` probes the primary key for each distinct key, whatever the
    -- statistics say; a join against unnest() may be planned as a scan of the table.
    found := ARRAY(SELECT d.key FROM pgbatch.documents d WHERE d.key = ANY(flush_ref_targets));
    IF EXISTS (
        SELECT 1 FROM unnest(flush_ref_targets) AS r(target)
        WHERE r.target NOT IN (SELECT unnest(found))
          AND r.target NOT IN (SELECT unnest(flush_keys))
    ) THEN
        RETURN found;
    END IF;
    PERFORM pgbatch.documents_upsert(
        flush_keys, flush_partitions, flush_types, flush_identities, flush_bodies);
    PERFORM pgbatch.documents_replace_references(flush_keys, flush_ref_parents, flush_ref_targets);
    RETURN NULL;
END
$fn$;
