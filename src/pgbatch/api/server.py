"""Build the FastAPI application over a pgbatch App, and run it with uvicorn."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncIterator
from importlib import resources

import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from pgbatch.api.auth import TokenTable, is_loopback
from pgbatch.api.errors import install_error_handlers
from pgbatch.api.metrics import ApiMetrics, MetricsMiddleware
from pgbatch.api.progress import ProgressHub
from pgbatch.api.routes import batches, collections, documents, events, system
from pgbatch.api.state import ApiState
from pgbatch.app import App
from pgbatch.engine.worker import Worker
from pgbatch.errors import ConfigurationError
from pgbatch.workloads import collections as copies

__all__ = ["check_bind", "create_api", "server"]


def create_api(app: App, *, worker: Worker | None = None) -> FastAPI:
    """Return the HTTP API (and dashboard) serving `app`; settings come from `app.settings`.

    `worker`: a worker running in the same process, whose completion flushes /metrics shows.
    """
    settings = app.settings
    tokens = TokenTable.parse(settings.api_tokens)
    metrics = ApiMetrics()
    if worker is not None:
        metrics.add_flush_source("completer", worker.completion_flush_sizes)
    hub = ProgressHub(app, min_interval_s=settings.sse_min_interval_s)
    state = ApiState(app=app, settings=settings, tokens=tokens, hub=hub, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(api: FastAPI) -> AsyncIterator[None]:
        await app.open()
        await hub.start()
        try:
            yield
        finally:
            await hub.close()
            for closer in state.extras.values():
                stop = getattr(closer, "stop", None)
                if stop is not None:
                    await stop()

    api = FastAPI(
        title="pgbatch",
        version="1",
        summary="Very large batches of work, run durably on PostgreSQL.",
        lifespan=lifespan,
    )
    api.state.pgbatch = state
    install_error_handlers(api)
    api.include_router(system.router)
    api.include_router(batches.router)
    api.include_router(events.router)
    api.include_router(documents.router)
    # The copy endpoints exist when the app runs the workload (its workers need the task).
    if copies.TASK in app.tasks:
        api.include_router(collections.router)
    static = resources.files("pgbatch.api").joinpath("static")
    api.mount("/static", StaticFiles(directory=str(static)), name="static")
    fixed_paths = frozenset(
        path for route in api.routes if "{" not in (path := getattr(route, "path", "{"))
    )
    api.add_middleware(MetricsMiddleware, metrics=metrics, fixed_paths=fixed_paths)
    return api


class _HideTokens(logging.Filter):
    """Mask `access_token=` in access-log lines: a token must not end up in a log file."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        return True


_TOKEN_IN_QUERY = re.compile(r"(access_token=)[^&\s]*")
logging.getLogger("uvicorn.access").addFilter(_HideTokens())


def check_bind(host: str, tokens: TokenTable) -> None:
    """Refuse to expose an unauthenticated API beyond this machine."""
    if not tokens.enabled and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without API tokens: anyone could reach every "
            "batch. Set PGBATCH_API_TOKENS (`pgbatch token new TENANT`) or bind to 127.0.0.1"
        )


def server(
    app: App, *, host: str, port: int, log_level: str = "info", worker: Worker | None = None
) -> uvicorn.Server:
    """Return a uvicorn server for the API of `app` (not started)."""
    check_bind(host, TokenTable.parse(app.settings.api_tokens))
    config = uvicorn.Config(
        create_api(app, worker=worker),
        host=host,
        port=port,
        log_level=log_level,
        # Event streams never end by themselves: give them this long, then close them.
        timeout_graceful_shutdown=2,
        lifespan="on",
    )
    return uvicorn.Server(config)
