-- Collections of items (companies, say) and the collection-copy workload
-- (pgbatch.workloads.collections); the tables are made by
-- its migrations (migrations/), in pgbatch's schema. Keys are text in the "C" collation: byte order, the
-- same as Python's sort of str, and compared with memcmp, the fastest text comparison.

-- name: collection_create
INSERT INTO pgbatch.collections (tenant, id, name) VALUES (%(tenant)s, %(id)s, %(name)s)
ON CONFLICT (tenant, id) DO NOTHING
RETURNING id;

-- name: collection_delete
-- The collection and its items, in one statement (the items have no foreign key to cascade).
WITH items AS (
    DELETE FROM pgbatch.collection_items WHERE tenant = %(tenant)s AND collection_id = %(id)s
)
DELETE FROM pgbatch.collections WHERE tenant = %(tenant)s AND id = %(id)s
RETURNING id;

-- name: collections_existing
SELECT id FROM pgbatch.collections WHERE tenant = %(tenant)s AND id = ANY(%(ids)s::text[]);

-- name: collection_items_add
-- Sorted, so that two concurrent adds lock keys in one order (invariant 6).
INSERT INTO pgbatch.collection_items (tenant, collection_id, item_id)
SELECT %(tenant)s, %(collection_id)s, u.item_id FROM unnest(%(item_ids)s::text[]) AS u(item_id)
ORDER BY u.item_id
ON CONFLICT DO NOTHING;

-- name: collection_items_generate
-- Synthetic items "<prefix><n>", n zero-padded to 9 digits so key order is numeric order.
INSERT INTO pgbatch.collection_items (tenant, collection_id, item_id)
SELECT %(tenant)s, %(collection_id)s, %(prefix)s || lpad(n::text, 9, '0')
FROM generate_series(%(first)s::bigint, %(first)s::bigint + %(count)s::bigint - 1) AS n
ORDER BY 3
ON CONFLICT DO NOTHING;

-- name: collection_items_count
SELECT count(*) FROM pgbatch.collection_items
WHERE tenant = %(tenant)s AND collection_id = %(collection_id)s;

-- name: collection_copy_plan_ranges
-- Cut the source's keys, in key order, into ranges of "keys" keys; return each range's
-- first and last key and how many keys it holds. One index-only scan of the source; only
-- the bounds leave the server.
SELECT min(item_id), max(item_id), count(*)
FROM (
    SELECT item_id, (row_number() OVER (ORDER BY item_id) - 1) / %(keys)s::bigint AS chunk
    FROM pgbatch.collection_items
    WHERE tenant = %(tenant)s AND collection_id = %(source)s
) AS numbered
GROUP BY chunk
ORDER BY chunk;

-- name: collection_copy_ranges
-- The at-commit statement of one shard of a copy of whole key ranges: insert the source's
-- keys in [first, last] of each range into the target, skipping those already there, and
-- record the counts under (batch, shard). It runs in the shard's completion transaction,
-- so the epoch fence decides whether any of it happens.
WITH
-- include: _collection_copy_scope
, span AS (
    SELECT * FROM unnest(%(firsts)s::text[], %(lasts)s::text[]) AS r(first_id, last_id)
), matched AS MATERIALIZED (
    SELECT s.item_id
    FROM span r
    CROSS JOIN scope sc
    JOIN pgbatch.collection_items s
      ON s.tenant = sc.tenant AND s.collection_id = %(source)s
     AND s.item_id BETWEEN r.first_id AND r.last_id
), absent AS (
    SELECT 0::bigint AS n  -- a range holds only what the source has
),
-- include: _collection_copy_insert_and_count

-- name: collection_copy_ids
-- The at-commit statement of one shard of a copy of listed keys: as collection_copy_ranges,
-- and the listed keys that the source does not hold are counted as not_in_source.
WITH
-- include: _collection_copy_scope
, matched AS MATERIALIZED (
    SELECT s.item_id
    FROM pgbatch.collection_items s, scope sc
    WHERE s.tenant = sc.tenant AND s.collection_id = %(source)s
      AND s.item_id = ANY(%(ids)s::text[])
), absent AS (
    SELECT cardinality(%(ids)s::text[]) - (SELECT count(*) FROM matched) AS n
),
-- include: _collection_copy_insert_and_count

-- name: _collection_copy_scope
-- The start of both copy statements: the tenant of the copy's batch, and whether that
-- tenant has the target. The statement re-checks what submit_copy checked, whatever its
-- items say (a batch of the internal task made by hand): it reads only that tenant's
-- source and inserts only into that tenant's existing target.
scope AS MATERIALIZED (
    SELECT b.tenant,
           EXISTS (SELECT 1 FROM pgbatch.collections c
                   WHERE c.tenant = b.tenant AND c.id = %(target)s) AS has_target
    FROM pgbatch.batches b
    WHERE b.id = %(batch_id)s
)

-- name: _collection_copy_insert_and_count
-- The end of both copy statements, after their CTEs "matched" (the source keys to copy)
-- and "absent" (how many asked-for keys the source lacks). Keys are inserted in key
-- order: two copies into one target lock keys in one order.
inserted AS (
    INSERT INTO pgbatch.collection_items (tenant, collection_id, item_id)
    SELECT sc.tenant, %(target)s, m.item_id FROM matched m, scope sc
    WHERE sc.has_target
    ORDER BY m.item_id
    ON CONFLICT DO NOTHING
    RETURNING 1
)
INSERT INTO pgbatch.collection_copy_stats (batch_id, shard_id, inserted, already_present, not_in_source)
SELECT %(batch_id)s, %(shard_id)s, i.n, CASE WHEN t.has THEN m.n - i.n ELSE 0 END, a.n
FROM (SELECT count(*) AS n FROM inserted) AS i, (SELECT count(*) AS n FROM matched) AS m,
     absent AS a, (SELECT coalesce(bool_or(has_target), false) AS has FROM scope) AS t;

-- name: collection_copy_counts
SELECT coalesce(sum(inserted), 0)::bigint,
       coalesce(sum(already_present), 0)::bigint,
       coalesce(sum(not_in_source), 0)::bigint
FROM pgbatch.collection_copy_stats
WHERE batch_id = %(batch_id)s;

-- name: collection_copy_endpoints
-- Every item of a copy names its source and target; the first one tells them.
SELECT payloads -> 0 ->> 'source', payloads -> 0 ->> 'target'
FROM pgbatch.item_blocks
WHERE batch_id = %(batch_id)s
ORDER BY first_seq
LIMIT 1;

-- name: collection_copy_stats_prune
-- A pruned batch's copy statistics, a bounded chunk at a time (pgbatch's retention).
DELETE FROM pgbatch.collection_copy_stats s
WHERE s.batch_id = %(batch_id)s
  AND s.shard_id IN (SELECT q.shard_id FROM pgbatch.collection_copy_stats q
                     WHERE q.batch_id = %(batch_id)s ORDER BY q.shard_id LIMIT %(limit)s);

-- name: collection_copy_stats_exists
SELECT to_regclass('pgbatch.collection_copy_stats') IS NOT NULL;
