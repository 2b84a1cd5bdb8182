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

-- name: documents_existing
-- The one existence check of a flush: which of the referenced keys are documents.
SELECT key FROM documents WHERE key = ANY(%(keys)b::uuid[]);

-- name: documents_upsert_many
-- Re-posting an identity replaces its body; created_at keeps the first post's time.
INSERT INTO documents AS d (key, partition, type, identity, body)
SELECT u.key, u.partition, u.type, u.identity, u.body
FROM unnest(%(keys)b::uuid[], %(partitions)b::text[], %(types)b::text[],
            %(identities)b::jsonb[], %(bodies)b::jsonb[])
    AS u(key, partition, type, identity, body)
ORDER BY u.key
ON CONFLICT (key) DO UPDATE
SET partition  = EXCLUDED.partition,
    type       = EXCLUDED.type,
    identity   = EXCLUDED.identity,
    body       = EXCLUDED.body,
    updated_at = now();

-- name: document_references_replace_many
-- The references of the given parents become exactly the (parent, target) pairs given:
-- stale ones are deleted, new ones inserted. The two parts touch disjoint rows, so one
-- statement does both.
WITH wanted AS (
    SELECT w.parent, w.target
    FROM unnest(%(ref_parents)b::uuid[], %(ref_targets)b::uuid[]) AS w(parent, target)
), stale AS (
    DELETE FROM document_references r
    WHERE r.parent = ANY(%(parents)b::uuid[])
      AND NOT EXISTS (SELECT 1 FROM wanted w WHERE w.parent = r.parent AND w.target = r.target)
)
INSERT INTO document_references (parent, target)
SELECT w.parent, w.target FROM wanted w
ORDER BY w.parent, w.target
ON CONFLICT (parent, target) DO NOTHING;


-- name: documents_lock_ddl
SELECT pg_advisory_xact_lock(hashtext('pgbatch_documents_tables'));
