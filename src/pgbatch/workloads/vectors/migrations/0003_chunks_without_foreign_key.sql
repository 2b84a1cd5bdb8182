-- Chunk tables without a foreign key to pgbatch.vector_documents.
--
-- Libraries made before this migration have `pgbatch.vector_chunks_<id>.document_id
-- REFERENCES pgbatch.vector_documents (id) ON DELETE CASCADE`. Dropping such a table
-- (deleting its library) takes ACCESS EXCLUSIVE on vector_documents until the delete
-- commits: every document read and write of every library of every tenant waits for one
-- tenant's library delete. The workload now deletes chunks itself (a document's with it,
-- a library's with its table: sql/vectors.sql), so the constraint goes, found by catalog
-- lookup whatever its name. Idempotent: a table without one is left alone. It depends on
-- no other vectors migration but 0001, so it applies the same before or after any 0002.
-- Its ALTERs take ACCESS EXCLUSIVE on vector_documents and each chunk table once, in this
-- one transaction (the migration runner waits for them).
DO $migration$
DECLARE
    fk record;
BEGIN
    FOR fk IN
        SELECT t.relname AS chunks, c.conname
        FROM pg_constraint c
        JOIN pg_class t ON t.oid = c.conrelid
        WHERE c.contype = 'f'
          AND c.confrelid = 'pgbatch.vector_documents'::regclass
          AND t.relnamespace = 'pgbatch'::regnamespace
          AND t.relname ~ '^vector_chunks_[0-9]+$'
        ORDER BY t.relname, c.conname
    LOOP
        EXECUTE format('ALTER TABLE pgbatch.%I DROP CONSTRAINT %I', fk.chunks, fk.conname);
    END LOOP;
END
$migration$;
