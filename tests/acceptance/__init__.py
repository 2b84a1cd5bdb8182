"""Acceptance tests: the CLI, worker processes and signals, the demo."""
