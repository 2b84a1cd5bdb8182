-- Items and results one row per shard (issue 13 §3, docs/design/storage-layout.md): a
-- shard's items as one JSON array text, its results as one JSON array of outputs (null at
-- a failed item's position), and each failed item as a small row of its own. Two per-item
-- COPYs cannot exceed about 0.48x the results COPY ceiling; these rows cost 4 to 15 times
-- less to write. Per-item semantics are kept exactly; views of the old names show the
-- blocks as one row per item. Every row of the old tables is converted in this one
-- transaction; data that does not fit the shards it belongs to stops the upgrade.

-- A shard's items, in seq order from first_seq (= shard_no * shard_size).
CREATE TABLE pgbatch.item_blocks (
    batch_id  bigint NOT NULL,
    first_seq bigint NOT NULL,
    payloads  json   NOT NULL,
    PRIMARY KEY (batch_id, first_seq)
);

-- A shard's results once it has ended: one position per item, its output if it succeeded.
CREATE TABLE pgbatch.result_blocks (
    batch_id  bigint NOT NULL,
    first_seq bigint NOT NULL,
    outputs   json   NOT NULL,
    PRIMARY KEY (batch_id, first_seq)
);

-- A failed item's result; `retrying` while a retry of its batch runs it again (then the
-- item has no result). Failures are few: `?status=error` reads these rows alone.
CREATE TABLE pgbatch.result_errors (
    batch_id         bigint  NOT NULL,
    seq              bigint  NOT NULL,
    error            text    NOT NULL,
    traceback_digest bytea,
    retrying         boolean NOT NULL DEFAULT false,
    PRIMARY KEY (batch_id, seq)
);

-- The rows of pruned batches (a tombstone, no batch row) are what the pruner is deleting,
-- unreachable by every API (410): they are not converted.
DELETE FROM pgbatch.items i
WHERE NOT EXISTS (SELECT 1 FROM pgbatch.batches b WHERE b.id = i.batch_id);
DELETE FROM pgbatch.results r
WHERE NOT EXISTS (SELECT 1 FROM pgbatch.batches b WHERE b.id = r.batch_id);

DO $$
DECLARE
    bad record;
BEGIN
    -- A block holds its shard's items by position: they must be the contiguous seqs
    -- from the shard's start. pgbatch never wrote anything else; stop rather than move one.
    SELECT g.batch_id, g.first_seq INTO bad
    FROM (SELECT i.batch_id, (i.seq / b.shard_size) * b.shard_size AS first_seq,
                 min(i.seq) AS lo, max(i.seq) AS hi, count(*) AS n
          FROM pgbatch.items i JOIN pgbatch.batches b ON b.id = i.batch_id
          GROUP BY 1, 2) g
    WHERE g.lo <> g.first_seq OR g.hi - g.lo + 1 <> g.n
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgbatch 0009: items of batch % from seq % are not contiguous',
            bad.batch_id, bad.first_seq;
    END IF;
    -- Every result is a result of one of its batch's items.
    SELECT r.batch_id, r.seq INTO bad
    FROM pgbatch.results r
    WHERE NOT EXISTS (SELECT 1 FROM pgbatch.items i
                      WHERE i.batch_id = r.batch_id AND i.seq = r.seq)
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'pgbatch 0009: result of batch % seq % has no item',
            bad.batch_id, bad.seq;
    END IF;
END
$$;

INSERT INTO pgbatch.item_blocks (batch_id, first_seq, payloads)
SELECT i.batch_id, (i.seq / b.shard_size) * b.shard_size,
       ('[' || string_agg(i.payload::text, ',' ORDER BY i.seq) || ']')::json
FROM pgbatch.items i JOIN pgbatch.batches b ON b.id = i.batch_id
GROUP BY 1, 2;

-- A result block for every shard range that has a result, or that a retry reopened (its
-- failed results were deleted by the old retry: those items have none until they rerun).
CREATE TEMPORARY TABLE pgbatch_0009_ranges ON COMMIT DROP AS
SELECT ib.batch_id, ib.first_seq, ib.first_seq + json_array_length(ib.payloads) - 1 AS last_seq
FROM pgbatch.item_blocks ib
WHERE EXISTS (SELECT 1 FROM pgbatch.results r
              WHERE r.batch_id = ib.batch_id
                AND r.seq BETWEEN ib.first_seq
                              AND ib.first_seq + json_array_length(ib.payloads) - 1)
   OR EXISTS (SELECT 1 FROM pgbatch.shards s
              WHERE s.batch_id = ib.batch_id AND s.first_seq = ib.first_seq AND s.retried);

INSERT INTO pgbatch.result_blocks (batch_id, first_seq, outputs)
SELECT g.batch_id, g.first_seq,
       ('[' || string_agg(CASE WHEN r.ok AND r.output IS NOT NULL THEN r.output::text
                               ELSE 'null' END, ',' ORDER BY x.seq) || ']')::json
FROM pgbatch_0009_ranges g
CROSS JOIN LATERAL generate_series(g.first_seq, g.last_seq) AS x(seq)
LEFT JOIN pgbatch.results r ON r.batch_id = g.batch_id AND r.seq = x.seq
GROUP BY g.batch_id, g.first_seq;

-- Failed results keep their error and traceback; a position without a result (a retried
-- shard still to run) is marked retrying, which its rerun resolves.
INSERT INTO pgbatch.result_errors (batch_id, seq, error, traceback_digest, retrying)
SELECT g.batch_id, x.seq, coalesce(r.error, 'retrying'), r.traceback_digest, r.seq IS NULL
FROM pgbatch_0009_ranges g
CROSS JOIN LATERAL generate_series(g.first_seq, g.last_seq) AS x(seq)
LEFT JOIN pgbatch.results r ON r.batch_id = g.batch_id AND r.seq = x.seq
WHERE r.seq IS NULL OR NOT r.ok;

DROP TABLE pgbatch.items;
DROP TABLE pgbatch.results;

-- The blocks as one row per item, under the old names and columns: for people's SQL and
-- the few lookups that name one item. pgbatch's hot paths read the blocks.
CREATE VIEW pgbatch.items AS
SELECT b.batch_id, b.first_seq + e.ord - 1 AS seq, e.payload
FROM pgbatch.item_blocks b
CROSS JOIN LATERAL json_array_elements(b.payloads) WITH ORDINALITY AS e(payload, ord);

CREATE VIEW pgbatch.results AS
SELECT b.batch_id, b.first_seq + e.ord - 1 AS seq, er.seq IS NULL AS ok,
       CASE WHEN er.seq IS NULL AND json_typeof(e.output) <> 'null' THEN e.output END
           AS output,
       er.error, er.traceback_digest
FROM pgbatch.result_blocks b
CROSS JOIN LATERAL json_array_elements(b.outputs) WITH ORDINALITY AS e(output, ord)
LEFT JOIN pgbatch.result_errors er
    ON er.batch_id = b.batch_id AND er.seq = b.first_seq + e.ord - 1
WHERE er.retrying IS NOT TRUE;
