-- Vector libraries, their documents and chunks (pgbatch.workloads.vectors). The tables are
-- made by the workload's migrations; each library's chunk table (`{chunks}` below,
-- pgbatch.vector_chunks_<id>) is made when the library is created. Queries with `{…}`
-- placeholders are composed with psycopg.sql (identifiers quoted), never with user text.

-- name: vector_extension_state
-- Whether pgvector is installed in this database, and whether the server could install it.
SELECT EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'vector'),
       EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'vector');

-- name: vector_extension_lock
-- Concurrent first libraries serialise their CREATE EXTENSION here (IF NOT EXISTS alone
-- still lets two of them collide on pg_extension's unique index).
SELECT pg_advisory_xact_lock(hashtext('pgbatch.vectors.extension'));

-- name: vector_extension_create
CREATE EXTENSION IF NOT EXISTS vector;

-- name: vector_library_insert
-- The unique constraint on (tenant, name) decides a duplicate: no row comes back then.
INSERT INTO pgbatch.vector_libraries (tenant, name, metadata, embedder, dimension)
VALUES (%(tenant)s, %(name)s, %(metadata)s, %(embedder)s, %(dimension)s)
ON CONFLICT ON CONSTRAINT vector_libraries_tenant_name_key DO NOTHING
RETURNING id, tenant, name, metadata, embedder, dimension, version, created_at, updated_at;

-- name: vector_chunks_create
-- The library's chunk table; the embedding has the library's dimension, which HNSW needs.
-- A chunk is its document's, but with no foreign key to pgbatch.vector_documents: dropping
-- a table that has one takes ACCESS EXCLUSIVE on the referenced table until the drop
-- commits, so one library's delete would stop every document read and write of every
-- library of every tenant. The workload deletes the chunks itself instead: a document's
-- with it (vector_chunks_delete_document), a library's with its table (vector_chunks_drop),
-- and an indexing commit writes chunks only for documents it holds locked and present.
CREATE TABLE pgbatch.{chunks} (
    document_id     bigint NOT NULL,
    seq             integer NOT NULL,
    content_version bigint NOT NULL,
    text            text NOT NULL,
    embedding       vector({dimension}) NOT NULL,
    PRIMARY KEY (document_id, seq)
);

-- name: vector_chunks_index
-- HNSW on cosine distance; m and ef_construction come from queries.HNSW_M and
-- HNSW_EF_CONSTRUCTION (docs/vectors.md has the recall they give here).
CREATE INDEX {index} ON pgbatch.{chunks} USING hnsw (embedding vector_cosine_ops)
WITH (m = {m}, ef_construction = {ef_construction});

-- name: vector_chunks_drop
DROP TABLE IF EXISTS pgbatch.{chunks};

-- name: vector_library_get
SELECT id, tenant, name, metadata, embedder, dimension, version, created_at, updated_at
FROM pgbatch.vector_libraries
WHERE id = %(id)s AND tenant = %(tenant)s;

-- name: vector_library_lock
-- The library row for a delete: taken before its chunk table and its documents (the
-- order vector_index_commit takes them in), so a delete and a commit cannot deadlock.
SELECT version FROM pgbatch.vector_libraries
WHERE id = %(id)s AND tenant = %(tenant)s
FOR UPDATE;

-- name: vector_library_list
SELECT id, tenant, name, metadata, embedder, dimension, version, created_at, updated_at
FROM pgbatch.vector_libraries
WHERE tenant = %(tenant)s AND id > %(after)s
ORDER BY id
LIMIT %(limit)s;

-- name: vector_library_update
-- Only against the version the client read: no row back means stale (or missing).
UPDATE pgbatch.vector_libraries
SET name = coalesce(%(name)s, name),
    metadata = coalesce(%(metadata)s, metadata),
    version = version + 1,
    updated_at = now()
WHERE id = %(id)s AND tenant = %(tenant)s AND version = %(version)s
RETURNING id, tenant, name, metadata, embedder, dimension, version, created_at, updated_at;

-- name: vector_library_delete
DELETE FROM pgbatch.vector_libraries
WHERE id = %(id)s AND tenant = %(tenant)s AND version = %(version)s
RETURNING id;

-- name: vector_document_insert_many
-- New documents of one library, all pending at content version 1.
INSERT INTO pgbatch.vector_documents (library_id, metadata, body, chunks)
SELECT %(library_id)s, u.metadata, u.body, u.chunks
FROM unnest(%(metadatas)s::jsonb[], %(bodies)s::text[], %(chunk_lists)s::jsonb[])
    WITH ORDINALITY AS u(metadata, body, chunks, n)
ORDER BY u.n
RETURNING id, library_id, metadata, status, error, version, content_version,
          indexed_version, chunk_count, batch_id, created_at, updated_at;

-- name: vector_document_set_batch
-- Record which batch indexes these documents at their content version (for the dashboard
-- and GET; a newer request has its own batch, so the older one does not overwrite it).
UPDATE pgbatch.vector_documents d
SET batch_id = %(batch_id)s
FROM unnest(%(ids)s::bigint[], %(content_versions)s::bigint[]) AS u(id, content_version)
WHERE d.id = u.id AND d.content_version = u.content_version;

-- name: vector_document_get
SELECT d.id, d.library_id, d.metadata, d.status, d.error, d.version, d.content_version,
       d.indexed_version, d.chunk_count, d.batch_id, d.created_at, d.updated_at
FROM pgbatch.vector_documents d
JOIN pgbatch.vector_libraries l ON l.id = d.library_id
WHERE d.id = %(id)s AND d.library_id = %(library_id)s AND l.tenant = %(tenant)s;

-- name: vector_document_list
SELECT d.id, d.library_id, d.metadata, d.status, d.error, d.version, d.content_version,
       d.indexed_version, d.chunk_count, d.batch_id, d.created_at, d.updated_at
FROM pgbatch.vector_documents d
JOIN pgbatch.vector_libraries l ON l.id = d.library_id
WHERE d.library_id = %(library_id)s AND l.tenant = %(tenant)s AND d.id > %(after)s
  AND (%(status)s::text IS NULL OR d.status = %(status)s::text)
ORDER BY d.id
LIMIT %(limit)s;

-- name: vector_document_status_counts
SELECT d.status, count(*)
FROM pgbatch.vector_documents d
JOIN pgbatch.vector_libraries l ON l.id = d.library_id
WHERE d.library_id = %(library_id)s AND l.tenant = %(tenant)s
GROUP BY d.status;

-- name: vector_document_update
UPDATE pgbatch.vector_documents d
SET metadata = %(metadata)s, version = d.version + 1, updated_at = now()
FROM pgbatch.vector_libraries l
WHERE d.id = %(id)s AND d.library_id = %(library_id)s AND l.id = d.library_id
  AND l.tenant = %(tenant)s AND d.version = %(version)s
RETURNING d.id, d.library_id, d.metadata, d.status, d.error, d.version, d.content_version,
          d.indexed_version, d.chunk_count, d.batch_id, d.created_at, d.updated_at;

-- name: vector_document_reindex
-- A new content version (new content when given, else the same): pending again, and the
-- indexing items of older versions will find they are stale and write nothing. Ids in
-- order, so two re-indexes of overlapping sets lock rows in one order.
UPDATE pgbatch.vector_documents d
SET content_version = d.content_version + 1, version = d.version + 1,
    status = 'pending', error = NULL, updated_at = now(),
    body = CASE WHEN %(replace)s THEN %(body)s::text ELSE d.body END,
    chunks = CASE WHEN %(replace)s THEN %(chunks)s::jsonb ELSE d.chunks END
FROM (SELECT l.id FROM pgbatch.vector_documents l
      JOIN pgbatch.vector_libraries lib ON lib.id = l.library_id
      WHERE l.id = ANY(%(ids)s::bigint[]) AND l.library_id = %(library_id)s
        AND lib.tenant = %(tenant)s
        AND (%(version)s::bigint IS NULL OR l.version = %(version)s::bigint)
      ORDER BY l.id FOR UPDATE OF l) AS locked
WHERE d.id = locked.id
RETURNING d.id, d.library_id, d.metadata, d.status, d.error, d.version, d.content_version,
          d.indexed_version, d.chunk_count, d.batch_id, d.created_at, d.updated_at;

-- name: vector_document_delete
-- The library row FOR KEY SHARE first: a library delete (FOR UPDATE, then DROP TABLE of
-- the chunk table, then the documents' cascade) either has committed, and no row comes
-- back, or waits for this whole transaction, chunk delete included. Without it the two
-- would deadlock: this one on the dropped table, the delete's cascade on this document.
-- KEY SHARE lets a PATCH of the library, and other document deletes, go on meanwhile.
DELETE FROM pgbatch.vector_documents d
USING (SELECT id FROM pgbatch.vector_libraries
       WHERE id = %(library_id)s AND tenant = %(tenant)s
       FOR KEY SHARE) AS l
WHERE d.id = %(id)s AND d.library_id = l.id AND d.version = %(version)s
RETURNING d.id;

-- name: vector_chunks_delete_document
-- A deleted document's chunks, in the same transaction, as a statement of its own after
-- the document's delete: its snapshot is taken once the document row is this
-- transaction's, so it also sees the chunks of an indexing commit that held the row
-- before (one that comes after finds no document and writes none).
DELETE FROM pgbatch.{chunks} WHERE document_id = %(document_id)s;

-- name: vector_document_content
-- What an indexing shard needs of its documents, at the versions it was asked for (a
-- document re-indexed or deleted since is left out: a newer batch has it, or nobody).
SELECT d.id, d.content_version, d.body, d.chunks
FROM pgbatch.vector_documents d
JOIN unnest(%(ids)s::bigint[], %(content_versions)s::bigint[]) AS u(id, content_version)
  ON u.id = d.id AND u.content_version = d.content_version
WHERE d.library_id = %(library_id)s
ORDER BY d.id;

-- name: vector_document_mark_indexing
-- pending → indexing, only at the version this shard indexes: a newer request (pending
-- at a newer version) or a finished commit is never turned back into "indexing".
UPDATE pgbatch.vector_documents d
SET status = 'indexing', version = d.version + 1, updated_at = now()
FROM (SELECT l.id FROM pgbatch.vector_documents l
      JOIN unnest(%(ids)s::bigint[], %(content_versions)s::bigint[]) AS u(id, content_version)
        ON u.id = l.id AND u.content_version = l.content_version
      WHERE l.status = 'pending'
      ORDER BY l.id FOR UPDATE OF l) AS locked
WHERE d.id = locked.id;

-- name: vector_index_commit
SELECT pgbatch.vector_index_commit(
    %(library_id)s, %(ids)s::bigint[], %(content_versions)s::bigint[],
    %(chunk_documents)s::bigint[], %(chunk_seqs)s::integer[], %(chunk_texts)s::text[],
    %(chunk_embeddings)s::text[]);

-- name: vector_index_fail
SELECT pgbatch.vector_index_fail(
    %(library_id)s, %(ids)s::bigint[], %(content_versions)s::bigint[], %(errors)s::text[]);

-- name: vector_chunk_list
-- A document's chunks, in order (the embedding left out: it is large and opaque).
SELECT c.seq, c.content_version, c.text
FROM pgbatch.{chunks} c
WHERE c.document_id = %(document_id)s AND c.seq > %(after)s
ORDER BY c.seq
LIMIT %(limit)s;

-- name: vector_search_settings
-- Local to the search's transaction. Iterative index scans (pgvector 0.8): when a filter
-- drops rows the HNSW scan keeps going until k rows pass it or it has visited
-- max_scan_tuples (then the caller falls back to an exact search), instead of returning
-- fewer than k. The statement timeout bounds what one search may hold (0: none).
SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true),
       set_config('hnsw.ef_search', %(ef_search)s, true),
       set_config('hnsw.max_scan_tuples', %(max_scan_tuples)s, true),
       set_config('statement_timeout', %(statement_timeout)s, true);

-- name: vector_search_hnsw
-- k nearest chunks by cosine distance through the HNSW index; the filter is on the
-- document's metadata (jsonb containment). relaxed_order may return rows slightly out of
-- order: the outer ORDER BY restores it.
SELECT * FROM (
    SELECT c.document_id, c.seq, c.content_version, c.text, d.metadata,
           c.embedding <=> %(query)s::vector AS distance
    FROM pgbatch.{chunks} c
    JOIN pgbatch.vector_documents d ON d.id = c.document_id
    WHERE %(filter)s::jsonb IS NULL OR d.metadata @> %(filter)s::jsonb
    ORDER BY c.embedding <=> %(query)s::vector
    LIMIT %(k)s
) AS found
ORDER BY distance, document_id, seq;

-- name: vector_search_exact
-- The same, without the index: the distance is an expression the index cannot order by,
-- so every chunk that passes the filter is compared (exact, the recall baseline).
SELECT c.document_id, c.seq, c.content_version, c.text, d.metadata,
       c.embedding <=> %(query)s::vector AS distance
FROM pgbatch.{chunks} c
JOIN pgbatch.vector_documents d ON d.id = c.document_id
WHERE %(filter)s::jsonb IS NULL OR d.metadata @> %(filter)s::jsonb
ORDER BY (c.embedding <=> %(query)s::vector) + 0, c.document_id, c.seq
LIMIT %(k)s;

-- name: vector_library_by_id
-- For the indexing task only (internal: its items come from this workload's own checks).
SELECT id, tenant, name, metadata, embedder, dimension, version, created_at, updated_at
FROM pgbatch.vector_libraries
WHERE id = %(id)s;

-- name: vector_document_settle
-- Settle the documents an ended (or pruned) indexing batch still owns: those whose latest
-- indexing request is this batch's (batch_id is set in the transaction that submits the
-- batch, and a re-index moves it to its own batch in the transaction that bumps the
-- content version) and that it never finished. At most %(limit)s, locked in id order.
-- The UPDATE's own condition is the guard: a row locked by a concurrent re-index is
-- re-read after that commits, and then belongs to the new batch and is left alone.
-- Returns how many were candidates: each leaves the candidates (settled, or taken by
-- another request), so a caller loops until 0.
WITH candidates AS (
    SELECT d.id FROM pgbatch.vector_documents d
    WHERE d.batch_id = %(batch_id)s AND d.status IN ('pending', 'indexing')
    ORDER BY d.id
    LIMIT %(limit)s
), locked AS (
    SELECT d.id FROM pgbatch.vector_documents d
    JOIN candidates c ON c.id = d.id
    ORDER BY d.id
    FOR UPDATE OF d
), settled AS (
    UPDATE pgbatch.vector_documents d
    SET status = %(status)s, error = %(error)s, version = d.version + 1, updated_at = now()
    FROM locked l
    WHERE d.id = l.id AND d.batch_id = %(batch_id)s AND d.status IN ('pending', 'indexing')
    RETURNING 1
)
SELECT (SELECT count(*) FROM candidates), (SELECT count(*) FROM settled);

-- name: vector_documents_exist
SELECT to_regclass('pgbatch.vector_documents') IS NOT NULL;

-- name: vector_import_sequence
-- The sequence behind vector_documents.id: an import's staged rows draw their ids from it.
SELECT pg_get_serial_sequence('pgbatch.vector_documents', 'id');

-- name: vector_import_stage
-- An import's documents, streamed here by COPY in the import's transaction (dropped at its
-- end, committed or not). Ids are drawn as rows arrive, so the batch's items can name them
-- before the documents themselves are inserted, with their batch, in one statement.
CREATE TEMP TABLE vector_import (
    id       bigint NOT NULL DEFAULT nextval({sequence}::regclass),
    line     bigint NOT NULL,
    metadata jsonb NOT NULL,
    body     text,
    chunks   jsonb
) ON COMMIT DROP;

-- name: vector_import_copy
COPY pg_temp.vector_import (line, metadata, body, chunks) FROM STDIN;

-- name: vector_import_ranges
-- The staged ids as runs of consecutive values (islands): one run unless other sessions
-- drew ids meanwhile, so the items are generated from a few pairs, not held as a list.
SELECT min(id), max(id)
FROM (SELECT id, id - row_number() OVER (ORDER BY id) AS run FROM pg_temp.vector_import) r
GROUP BY run
ORDER BY 1;

-- name: vector_import_insert
-- The staged documents, pending at content version 1, owned by the import's batch.
INSERT INTO pgbatch.vector_documents (id, library_id, metadata, body, chunks, batch_id)
OVERRIDING SYSTEM VALUE
SELECT id, %(library_id)s, metadata, body, chunks, %(batch_id)s
FROM pg_temp.vector_import
ORDER BY id;
