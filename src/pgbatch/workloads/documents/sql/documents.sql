-- Documents written by the group-commit writer (pgbatch.workloads.documents): one row
-- per identity, and the references between them, in tables and write functions its
-- migrations (migrations/) make in pgbatch's schema. Every statement takes whole flushes
-- as arrays, ordered by key so concurrent flushes lock rows in one order (invariant 6).

-- name: documents_write_flush
SELECT pgbatch.documents_write_flush(%(keys)b::uuid[], %(partitions)b::text[], %(types)b::text[],
                             %(identities)b::jsonb[], %(bodies)b::jsonb[],
                             %(ref_parents)b::uuid[], %(ref_targets)b::uuid[]);

-- name: documents_existing
-- The existence check of a flush that isolates a failing item.
SELECT key FROM pgbatch.documents WHERE key = ANY(%(keys)b::uuid[]);

-- name: documents_upsert_many
SELECT pgbatch.documents_upsert(%(keys)b::uuid[], %(partitions)b::text[], %(types)b::text[],
                        %(identities)b::jsonb[], %(bodies)b::jsonb[]);

-- name: document_references_replace_many
SELECT pgbatch.documents_replace_references(%(parents)b::uuid[], %(ref_parents)b::uuid[],
                                    %(ref_targets)b::uuid[]);

-- name: document_get
-- One tenant's document, with the identities of the documents it references (in key
-- order). A document's tenant is its identity's "tenant" member, the default tenant's
-- when it has none: the API adds that member for every other tenant and refuses it from
-- the default one, so the two kinds of identity never meet (issue 9).
SELECT d.key, d.identity, d.body,
       (SELECT coalesce(jsonb_agg(t.identity ORDER BY r.target), '[]'::jsonb)
        FROM pgbatch.document_references r JOIN pgbatch.documents t ON t.key = r.target
        WHERE r.parent = d.key) AS refs
FROM pgbatch.documents d
WHERE d.key = %(key)s
  AND coalesce(d.identity ->> 'tenant', %(default_tenant)s) = %(tenant)s;
