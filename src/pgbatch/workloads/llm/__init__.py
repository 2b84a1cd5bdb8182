"""LLM batches in the OpenAI batch format: request files, usage and cost, a fake upstream."""

from __future__ import annotations

from pgbatch.workload import Workload
from pgbatch.workloads.llm.batches import TASK, output_lines, register_tasks, submit_requests

__all__ = ["TASK", "WORKLOAD", "output_lines", "submit_requests"]

WORKLOAD = Workload(name="llm", install=register_tasks)
