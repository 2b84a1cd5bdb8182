"""Workloads that ship with pgbatch, one package each: `app.use(<package>.WORKLOAD)`.

A workload owns its Python, its SQL (its own query map), its migrations and its HTTP
router; pgbatch's core (`db`, `engine`, `writer`, `api`) never imports one.
"""
