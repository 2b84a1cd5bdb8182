"""The HTTP face of pgbatch: the /v1 API, its event streams and the dashboard."""
