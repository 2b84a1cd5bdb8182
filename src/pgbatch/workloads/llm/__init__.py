"""LLM batches in the OpenAI batch format: request files, usage and cost, a fake upstream."""

from __future__ import annotations

from typing import Any

from pgbatch.workload import Workload
from pgbatch.workloads.llm.batches import TASK, output_lines, register_tasks, submit_requests

__all__ = ["TASK", "WORKLOAD", "output_lines", "submit_requests"]


def _router() -> Any:
    # Imported only when the API is served: a library user needs no web stack.
    from pgbatch.workloads.llm.batch_api.routes import router

    return router


WORKLOAD = Workload(
    name="llm",
    install=register_tasks,
    # Its migrations (the OpenAI Batch API's files and batches) are recorded as "llm".
    migrations_package="pgbatch.workloads.llm",
    router=_router,
)
