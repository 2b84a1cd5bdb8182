-- name: notify_listen
-- The channel is a quoted identifier filled in by db.notify.listen: LISTEN takes no parameter.
LISTEN {channel};
