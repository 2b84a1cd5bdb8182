-- pgbatch's retention (issue 13) removes a pruned batch's rows in bounded chunks after its
-- batch row. A cascading foreign key from one row per request would delete them all at
-- once, in the transaction that removes the batch row (a million requests: one long
-- transaction). The workload's prune hook deletes them a chunk at a time instead.
ALTER TABLE pgbatch.llm_request_usage DROP CONSTRAINT llm_request_usage_batch_id_fkey;
