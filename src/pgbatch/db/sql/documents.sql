-- Documents written by the group-commit writer (pgbatch.writer.documents): one row per
-- identity, and the references between them. Every statement takes whole flushes as
-- arrays, ordered by key so concurrent flushes lock rows in one order (invariant 6).

-- name: documents_create_tables
-- Idempotent; the table of references is not called "references" (a reserved word).
-- Its foreign keys make "every reference points at a document" a fact of the database:
-- the writer inserts all documents of a flush before their references, so references
-- inside one flush, cycles included, pass the immediate checks.
CREATE TABLE IF NOT EXISTS documents (
    key        uuid        PRIMARY KEY,
    partition  text        NOT NULL,
    type       text        NOT NULL,
    identity   jsonb       NOT NULL,
    body       jsonb       NOT NULL CONSTRAINT documents_body_is_object
                               CHECK (jsonb_typeof(body) = 'object'),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS document_references (
    parent uuid NOT NULL REFERENCES documents (key) ON DELETE CASCADE,
    target uuid NOT NULL REFERENCES documents (key),
    PRIMARY KEY (parent, target)
);
-- "Who references this document?", and the foreign key's check when one is deleted.
CREATE INDEX IF NOT EXISTS document_references_target_idx ON document_references (target);

-- name: documents_create_functions
-- The writes of a flush, as functions: the fast path calls documents_write_flush (one
-- round trip, one implicit transaction); a flush that isolates a failing item calls the
-- two parts separately, each bisected inside savepoints. Why functions and not one
-- statement with data-modifying CTEs: every statement of a VOLATILE function takes a
-- fresh snapshot (READ COMMITTED), so when the upsert had to wait for a concurrent post
-- of the same key, the replacement of the references then sees that post's references
-- and removes the stale ones. The CTEs of one statement share the snapshot taken before
-- the wait, and would leave them behind.
CREATE OR REPLACE FUNCTION documents_upsert(
    flush_keys uuid[], flush_partitions text[], flush_types text[],
    flush_identities jsonb[], flush_bodies jsonb[]
) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    -- Re-posting an identity replaces its body; created_at keeps the first post's time.
    INSERT INTO documents AS d (key, partition, type, identity, body)
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

CREATE OR REPLACE FUNCTION documents_replace_references(
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
        DELETE FROM document_references r
        WHERE r.parent = ANY(flush_parents)
          AND NOT EXISTS (
              SELECT 1 FROM wanted w WHERE w.parent = r.parent AND w.target = r.target)
    )
    INSERT INTO document_references (parent, target)
    SELECT w.parent, w.target FROM wanted w
    ORDER BY w.parent, w.target
    ON CONFLICT (parent, target) DO NOTHING;
END
$fn$;

-- The whole flush, unless a referenced key is neither a document nor one of the flush's
-- own keys: then it writes nothing and returns the referenced keys that are documents
-- (what the writer needs to decide which items to keep). NULL means written.
CREATE OR REPLACE FUNCTION documents_write_flush(
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
    found := ARRAY(SELECT d.key FROM documents d WHERE d.key = ANY(flush_ref_targets));
    IF EXISTS (
        SELECT 1 FROM unnest(flush_ref_targets) AS r(target)
        WHERE r.target NOT IN (SELECT unnest(found))
          AND r.target NOT IN (SELECT unnest(flush_keys))
    ) THEN
        RETURN found;
    END IF;
    PERFORM documents_upsert(
        flush_keys, flush_partitions, flush_types, flush_identities, flush_bodies);
    PERFORM documents_replace_references(flush_keys, flush_ref_parents, flush_ref_targets);
    RETURN NULL;
END
$fn$;

-- name: documents_write_flush
SELECT documents_write_flush(%(keys)b::uuid[], %(partitions)b::text[], %(types)b::text[],
                             %(identities)b::jsonb[], %(bodies)b::jsonb[],
                             %(ref_parents)b::uuid[], %(ref_targets)b::uuid[]);

-- name: documents_existing
-- The existence check of a flush that isolates a failing item.
SELECT key FROM documents WHERE key = ANY(%(keys)b::uuid[]);

-- name: documents_upsert_many
SELECT documents_upsert(%(keys)b::uuid[], %(partitions)b::text[], %(types)b::text[],
                        %(identities)b::jsonb[], %(bodies)b::jsonb[]);

-- name: document_references_replace_many
SELECT documents_replace_references(%(parents)b::uuid[], %(ref_parents)b::uuid[],
                                    %(ref_targets)b::uuid[]);

-- name: documents_lock_ddl
SELECT pg_advisory_xact_lock(hashtext('pgbatch_documents_tables'));

-- name: document_get
-- One tenant's document, with the identities of the documents it references (in key
-- order). A document's tenant is its identity's "tenant" member, the default tenant's
-- when it has none: the API adds that member for every other tenant and refuses it from
-- the default one, so the two kinds of identity never meet (issue 9).
SELECT d.key, d.identity, d.body,
       (SELECT coalesce(jsonb_agg(t.identity ORDER BY r.target), '[]'::jsonb)
        FROM document_references r JOIN documents t ON t.key = r.target
        WHERE r.parent = d.key) AS refs
FROM documents d
WHERE d.key = %(key)s
  AND coalesce(d.identity ->> 'tenant', %(default_tenant)s) = %(tenant)s;
