"""LLM batches on the engine: the request task, submitting request files, reading result lines.

The seam between the workload's parts: `submit_requests` turns checked request lines into
a pgbatch batch of the `llm.request` task, and `output_lines` reads its results back as
OpenAI batch output lines (`errors=True`: the error file's lines). The HTTP Files/Batches
API, the CLI and the library call all go through these two functions.

Each item's result is its output line: an ok outcome for a 2xx answer, an error outcome
whose message is the JSON line otherwise, so the batch's failed count is honest and the
error file needs no second store.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from pgbatch.engine.context import ShardContext
from pgbatch.models import Batch, Item, Outcome, error, ok
from pgbatch.workloads.llm.requests import LlmRequest
from pgbatch.workloads.llm.results import failure_line, is_error_line, result_line
from pgbatch.workloads.llm.upstream import UpstreamClient, UpstreamConfig

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = [
    "TASK",
    "line_id",
    "output_lines",
    "register_tasks",
    "run_requests",
    "submit_requests",
    "upstream_client_close",
    "upstream_from_env",
]

TASK = "llm.request"
# Requests per shard: one shard's requests go out together, so this bounds a worker's
# burst per claimed shard and how much one lost lease re-sends.
DEFAULT_SHARD_SIZE = 50

_client: UpstreamClient | None = None


def upstream_from_env() -> UpstreamConfig:
    """Return the upstream named by PGBATCH_LLM_BASE_URL / PGBATCH_LLM_API_KEY."""
    base_url = os.environ.get("PGBATCH_LLM_BASE_URL", "")
    if not base_url:
        raise RuntimeError("no LLM upstream configured: set PGBATCH_LLM_BASE_URL (…/v1)")
    return UpstreamConfig(base_url=base_url, api_key=os.environ.get("PGBATCH_LLM_API_KEY"))


def _upstream() -> UpstreamClient:
    global _client
    if _client is None:
        _client = UpstreamClient(upstream_from_env())
    return _client


async def upstream_client_close() -> None:
    """Close this process's upstream client (its connection pool), if one was opened."""
    global _client
    if _client is not None:
        await _client.aclose()
        _client = None


def line_id(batch_id: int, seq: int) -> str:
    """Return the stable `id` of a result line (one per request, the same on every read)."""
    return f"batch_req_{batch_id}_{seq}"


async def run_requests(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Send a shard's requests to the upstream and return each one's result line."""
    client = _upstream()
    replies = await asyncio.gather(*(client.send(i.value["url"], i.value["body"]) for i in items))
    outcomes = []
    for item, reply in zip(items, replies, strict=True):
        line = result_line(line_id(ctx.batch_id, item.seq), item.value["custom_id"], reply)
        outcomes.append(error(orjson.dumps(line).decode()) if is_error_line(line) else ok(line))
    return outcomes


def register_tasks(app: App) -> None:
    """Register the request task on `app` (what `app.use(llm.WORKLOAD)` runs)."""
    if TASK in app.tasks:
        return
    app.task(TASK, shard_size=DEFAULT_SHARD_SIZE)(run_requests)


async def submit_requests(
    app: App,
    requests: Iterable[LlmRequest] | AsyncIterable[LlmRequest],
    *,
    tenant: str = "default",
    idempotency_key: str | None = None,
) -> Batch:
    """Submit checked requests as one batch of the request task and return the batch."""
    if isinstance(requests, AsyncIterable):
        stream = requests

        async def items() -> AsyncIterator[dict[str, Any]]:
            async for request in stream:
                yield request.as_item()

        return await app.submit(TASK, items(), tenant=tenant, idempotency_key=idempotency_key)
    return await app.submit(
        TASK, (r.as_item() for r in requests), tenant=tenant, idempotency_key=idempotency_key
    )


async def output_lines(
    app: App, batch_id: int, *, errors: bool = False, tenant: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Yield the batch's output lines in request order (`errors=True`: the error lines)."""
    async for seq, outcome in app.results(batch_id, errors_only=errors, tenant=tenant):
        if outcome.ok and not errors:
            yield outcome.output
        elif not outcome.ok and errors:
            yield _error_line(batch_id, seq, outcome.error or "")


def _error_line(batch_id: int, seq: int, message: str) -> dict[str, Any]:
    try:
        line = orjson.loads(message)
    except orjson.JSONDecodeError:
        line = None
    if isinstance(line, dict):
        return line
    # The engine's own failure (attempts exhausted, cancelled): no custom_id in the message.
    return failure_line(line_id(batch_id, seq), "", "batch_failed", message)
