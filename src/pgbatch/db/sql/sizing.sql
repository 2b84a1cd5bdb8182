-- name: sizing_probe_table
CREATE TEMP TABLE IF NOT EXISTS pgbatch_commit_probe (n int);

-- name: sizing_probe_insert
INSERT INTO pgbatch_commit_probe (n) VALUES (1);
