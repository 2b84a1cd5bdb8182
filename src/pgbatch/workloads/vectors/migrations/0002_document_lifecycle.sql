-- A document's processing state always ends (issue 11, "a document's processing state").
--
-- An indexing batch that ends without indexing some of its documents (a shard dead
-- after its attempts, an item isolated as poison, the batch cancelled, or pruned before
-- it was settled) no longer leaves them 'pending' or 'indexing': the workload settles
-- them when the batch ends (libraries.py, "settling"). 'cancelled' is the state of a
-- document whose indexing batch was cancelled: its older chunks, if it had any, stay
-- searchable (indexed_version says which version they are), as a failed one's do.
ALTER TABLE pgbatch.vector_documents
    DROP CONSTRAINT vector_documents_status_known,
    ADD CONSTRAINT vector_documents_status_known
        CHECK (status IN ('pending', 'indexing', 'indexed', 'failed', 'cancelled'));

-- The documents an indexing batch still owns, found by batch when it ends or is pruned.
-- A plain index on a column that status changes never touch: those updates stay HOT.
CREATE INDEX IF NOT EXISTS vector_documents_batch_idx ON pgbatch.vector_documents (batch_id);
