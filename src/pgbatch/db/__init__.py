"""The database layer: pool, embedded server, migrations and every query pgbatch runs."""
