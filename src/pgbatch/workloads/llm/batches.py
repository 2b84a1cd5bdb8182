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

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

import orjson

from pgbatch.errors import ConfigurationError, InvalidBatchError
from pgbatch.models import Batch
from pgbatch.workloads.llm.config import DEFAULT_UPSTREAM, load_config
from pgbatch.workloads.llm.requests import LlmRequest
from pgbatch.workloads.llm.results import failure_line
from pgbatch.workloads.llm.runner import line_id, runner_of, runners
from pgbatch.workloads.llm.upstream import UpstreamConfig

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = [
    "TASK",
    "check_upstream",
    "line_id",
    "output_lines",
    "register_tasks",
    "submit_requests",
    "upstream_client_close",
    "upstream_from_env",
]

TASK = "llm.request"
# Requests per shard: one shard's requests are reserved and go out together, so this
# bounds a worker's burst per claimed shard and how much one lost lease re-sends.
DEFAULT_SHARD_SIZE = 50


def upstream_from_env() -> UpstreamConfig:
    """Return the "default" upstream of the configuration (PGBATCH_LLM_* / its file)."""
    try:
        return load_config().upstream(DEFAULT_UPSTREAM).config
    except ConfigurationError as exc:
        raise RuntimeError(str(exc)) from exc


async def upstream_client_close() -> None:
    """Close the upstream clients (connection pools) of every App's runner in this process."""
    for runner in runners():
        await runner.aclose()


def register_tasks(app: App) -> None:
    """Register the request task on `app` (what `app.use(llm.WORKLOAD)` runs)."""
    if TASK in app.tasks:
        return
    # Internal: only the workload submits it (request files checked line by line first).
    app.task(TASK, shard_size=DEFAULT_SHARD_SIZE, internal=True)(runner_of(app).run)


def check_upstream(app: App, name: str) -> None:
    """Raise InvalidBatchError (field "upstream") unless `name` is a configured upstream.

    Otherwise a batch naming it is accepted and each of its shards fails when it runs.
    """
    try:
        runner_of(app).config.upstream(name)
    except ConfigurationError as exc:
        raise InvalidBatchError(str(exc), field="upstream") from None


async def submit_requests(
    app: App,
    requests: Iterable[LlmRequest] | AsyncIterable[LlmRequest],
    *,
    tenant: str = "default",
    idempotency_key: str | None = None,
    cache: bool = False,
    upstream: str | None = None,
    shard_size: int | None = None,
    lease_ttl_s: float | None = None,
) -> Batch:
    """Submit checked requests as one batch of the request task and return the batch.

    `cache=True` answers a request from a stored successful answer to the same canonical
    request (usage.cache_key) of this tenant, and stores this batch's answers; `upstream`
    names a configured upstream (default: "default"). Both ride on every item, so a shard
    knows them without another read and they cannot drift from the batch.
    """
    if upstream is not None:
        check_upstream(app, upstream)
    await app.open()
    await runner_of(app).ensure_schema()
    extra: dict[str, Any] = {}
    if cache:
        extra["cache"] = tenant
    if upstream is not None and upstream != DEFAULT_UPSTREAM:
        extra["upstream"] = upstream

    def item(request: LlmRequest) -> dict[str, Any]:
        return {**request.as_item(), **extra} if extra else request.as_item()

    options: dict[str, Any] = {"tenant": tenant, "idempotency_key": idempotency_key}
    if shard_size is not None:
        options["shard_size"] = shard_size
    if lease_ttl_s is not None:
        options["lease_ttl_s"] = lease_ttl_s
    if isinstance(requests, AsyncIterable):
        stream = requests

        async def items() -> AsyncIterator[dict[str, Any]]:
            async for request in stream:
                yield item(request)

        return await app.submit(TASK, items(), **options)
    return await app.submit(TASK, (item(r) for r in requests), **options)


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
