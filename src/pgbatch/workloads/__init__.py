"""Workloads that ship with pgbatch: tasks and the submit helpers that feed them."""

from pgbatch.workloads.collections import CopyReport, copy_report, install, submit_copy

__all__ = ["CopyReport", "copy_report", "install", "submit_copy"]
