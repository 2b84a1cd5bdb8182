"""Benchmarks: scripts that print pgbatch figures and their ratios to a same-run baseline."""
