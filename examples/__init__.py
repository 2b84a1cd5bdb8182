"""Runnable examples built on pgbatch."""
