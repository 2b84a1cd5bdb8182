-- The channel is a quoted identifier filled in by db.notify.listen: LISTEN takes no
-- parameter. Kept above the name on purpose: the statement the server shows in
-- pg_stat_activity then starts with LISTEN (benchmarks and tests wait for that).

-- name: notify_listen
LISTEN {channel};
