-- Infrastructure failures are not charged to a handler (issue 9, invariant 7): a shard
-- whose lease expired is requeued with its attempt refunded, at most
-- PGBATCH_LEASE_FREE_RERUNS times; this counts the refunds already given. A constant
-- default: PostgreSQL adds the column without rewriting the table.
ALTER TABLE pgbatch.shards ADD COLUMN lease_refunds integer NOT NULL DEFAULT 0;
