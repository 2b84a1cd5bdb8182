-- name: sizing_probe_commit
-- A transactional WAL message: its commit must flush WAL like any write, and it needs no
-- table. (A temporary table's rows are not WAL-logged, so its commits would flush nothing.)
SELECT pg_logical_emit_message(true, 'pgbatch', 'commit probe');
