"""LLM batches in the OpenAI batch format: shared rate limits, usage and cost, a cache.

`app.use(WORKLOAD)` registers the `llm.request` task, creates the workload's tables
(migrations/, component "llm") and, when the app is served, mounts `/v1/llm` and the
OpenAI Batch API under `/openai/v1` (docs/openai-batch-api.md). It also offers its shared
rate limits to the app's other workloads (`pgbatch.ratelimits.RATE_LIMITS`). docs/llm.md
describes the configuration (named upstreams, limits, prices) and the guarantees.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgbatch.ratelimits import RATE_LIMITS
from pgbatch.workload import Workload
from pgbatch.workloads.llm.batches import TASK, output_lines, register_tasks, submit_requests
from pgbatch.workloads.llm.queries import COMPONENT, prune_request_usage
from pgbatch.workloads.llm.shared_limits import PgRateLimits

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["TASK", "WORKLOAD", "output_lines", "submit_requests"]


async def _metrics(app: App) -> bytes:
    from pgbatch.workloads.llm.metrics import render

    return await render(app)


def _install(app: App) -> None:
    # The request task, and the shared limits offered to other workloads (an embedder
    # calling the same key draws from the same budget: shared_limits.py).
    register_tasks(app)
    if app.service(RATE_LIMITS) is None:
        app.provide(RATE_LIMITS, PgRateLimits(app))


def _router() -> Any:
    # Imported only when the API is served: a library user needs no web stack. Two
    # faces: our own /v1/llm (limits, usage) and the OpenAI Batch API under /openai/v1.
    from fastapi import APIRouter

    from pgbatch.workloads.llm.batch_api.routes import router as openai_batch_api
    from pgbatch.workloads.llm.routes import router as llm_routes

    router = APIRouter()
    router.include_router(llm_routes)
    router.include_router(openai_batch_api)

    return router


WORKLOAD = Workload(
    name=COMPONENT.name,
    install=_install,
    migrations_package=COMPONENT.package,
    router=_router,
    metrics=_metrics,
    prune_rows=prune_request_usage,
)
