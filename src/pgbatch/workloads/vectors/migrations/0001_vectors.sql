-- The vector-library workload's tables (pgbatch.workloads.vectors), in pgbatch's schema.
--
-- Nothing here needs pgvector: a server without the extension applies this migration
-- like any other. The vectors live in one table per library, `pgbatch.vector_chunks_<id>`,
-- made when the library is created (with `CREATE EXTENSION vector` then): its embedding
-- column has the library's fixed dimension, which an HNSW index needs, and deleting the
-- library drops it in the same transaction, so no chunk can outlive its library.
--
-- Versions: `version` is a row's ETag, bumped by every change a client can see.
-- A document's `content_version` is bumped by every request to (re-)index it; an
-- indexing item carries the content_version it was submitted for, and its commit writes
-- only while that is still the document's (vector_index_commit below).
CREATE TABLE IF NOT EXISTS pgbatch.vector_libraries (
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
    -- "Already exists" is this constraint's decision, never a check before the insert.
    CONSTRAINT vector_libraries_tenant_name_key UNIQUE (tenant, name)
);

CREATE TABLE IF NOT EXISTS pgbatch.vector_documents (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    library_id      bigint NOT NULL REFERENCES pgbatch.vector_libraries (id) ON DELETE CASCADE,
    metadata        jsonb NOT NULL DEFAULT '{}' CONSTRAINT vector_documents_metadata_is_object
                        CHECK (jsonb_typeof(metadata) = 'object'),
    -- The text to chunk, or the chunks given pre-cut (a JSON array of strings).
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
-- A library's documents in id order: its list pages, and the cascade of its delete.
CREATE INDEX IF NOT EXISTS vector_documents_library_idx
    ON pgbatch.vector_documents (library_id, id);

-- The indexing commit of one shard, run in the shard's fenced completion transaction
-- (ctx.execute_at_commit), so a worker that lost its lease runs none of it. For each
-- document (in id order: two commits lock documents in one order), only if the library
-- still exists and the document's content_version is still the one indexed: replace its
-- chunks by the new ones and mark it indexed. The replacement is one transaction, so a
-- search sees the old chunks or the new ones. The library row is locked FOR SHARE first:
-- a concurrent delete of the library (FOR UPDATE, then its cascade, then DROP TABLE)
-- either waits for this commit or has committed, and then this writes nothing.
-- Embeddings arrive as pgvector's text form ('[0.1,0.2]'), cast in the dynamic SQL: this
-- function must be creatable where the extension is missing.
CREATE OR REPLACE FUNCTION pgbatch.vector_index_commit(
    p_library_id bigint,
    p_document_ids bigint[], p_content_versions bigint[],
    p_chunk_documents bigint[], p_chunk_seqs integer[], p_chunk_texts text[],
    p_chunk_embeddings text[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    lib_dimension integer;
    written       bigint[];
BEGIN
    SELECT dimension INTO lib_dimension
    FROM pgbatch.vector_libraries WHERE id = p_library_id FOR SHARE;
    IF NOT FOUND THEN
        RETURN 0;  -- deleted meanwhile: its documents and chunk table are gone with it
    END IF;
    -- The documents' rows in id order before any is changed (invariant 6).
    PERFORM 1 FROM pgbatch.vector_documents
    WHERE id = ANY(p_document_ids) ORDER BY id FOR UPDATE;
    WITH wanted AS (
        SELECT w.id, w.content_version
        FROM unnest(p_document_ids, p_content_versions) AS w(id, content_version)
    ), marked AS (
        UPDATE pgbatch.vector_documents d
        SET status = 'indexed', error = NULL, indexed_version = w.content_version,
            version = d.version + 1, updated_at = now(),
            chunk_count = (SELECT count(*) FROM unnest(p_chunk_documents) AS c(doc)
                           WHERE c.doc = d.id)
        FROM wanted w
        WHERE d.id = w.id AND d.library_id = p_library_id
          AND d.content_version = w.content_version
        RETURNING d.id
    )
    SELECT coalesce(array_agg(id ORDER BY id), '{}') INTO written FROM marked;
    IF cardinality(written) = 0 THEN
        RETURN 0;  -- every document was re-indexed again, or deleted, meanwhile
    END IF;
    EXECUTE format('DELETE FROM pgbatch.%I WHERE document_id = ANY($1)',
                   'vector_chunks_' || p_library_id)
    USING written;
    EXECUTE format(
        'INSERT INTO pgbatch.%I (document_id, seq, content_version, text, embedding) '
        'SELECT c.doc, c.seq, w.content_version, c.text, c.embedding::vector '
        'FROM unnest($1, $2, $3, $4) AS c(doc, seq, text, embedding) '
        'JOIN unnest($5, $6) AS w(id, content_version) ON w.id = c.doc '
        'WHERE c.doc = ANY($7) ORDER BY c.doc, c.seq',
        'vector_chunks_' || p_library_id)
    USING p_chunk_documents, p_chunk_seqs, p_chunk_texts, p_chunk_embeddings,
          p_document_ids, p_content_versions, written;
    RETURN cardinality(written);
END
$fn$;

-- The failing end of an indexing commit: documents whose content could not be indexed
-- (a chunk too long for the embedder, a vector of the wrong dimension) are marked failed
-- with the reason, under the same conditions as vector_index_commit. Their old chunks,
-- if any, stay searchable.
CREATE OR REPLACE FUNCTION pgbatch.vector_index_fail(
    p_library_id bigint, p_document_ids bigint[], p_content_versions bigint[], p_errors text[]
) RETURNS integer
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    n integer;
BEGIN
    PERFORM 1 FROM pgbatch.vector_libraries WHERE id = p_library_id FOR SHARE;
    IF NOT FOUND THEN
        RETURN 0;
    END IF;
    PERFORM 1 FROM pgbatch.vector_documents
    WHERE id = ANY(p_document_ids) ORDER BY id FOR UPDATE;
    UPDATE pgbatch.vector_documents d
    SET status = 'failed', error = f.error, version = d.version + 1, updated_at = now()
    FROM unnest(p_document_ids, p_content_versions, p_errors) AS f(id, content_version, error)
    WHERE d.id = f.id AND d.library_id = p_library_id AND d.content_version = f.content_version;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$fn$;
