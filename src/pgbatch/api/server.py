"""Build the FastAPI application over a pgbatch App, and run it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from uvicorn.protocols.http.h11_impl import H11Protocol

from pgbatch.api.auth import TokenTable, is_loopback
from pgbatch.api.docs import install_offline_docs
from pgbatch.api.errors import install_error_handlers
from pgbatch.api.guards import RequestGuard, UploadSlots
from pgbatch.api.live import ProgressHub
from pgbatch.api.metrics import ApiMetrics, CompletionFlushes, MetricsMiddleware
from pgbatch.api.openapi import install_openapi, operation_id
from pgbatch.api.routes import batches, events, fleet, system
from pgbatch.api.state import ApiState
from pgbatch.app import App
from pgbatch.errors import ConfigurationError

__all__ = ["HeaderTimeoutH11Protocol", "check_bind", "create_api", "server"]


def create_api(app: App, *, worker: CompletionFlushes | None = None) -> FastAPI:
    """Return the HTTP API (and dashboard) serving `app`; settings come from `app.settings`.

    `worker`: a worker running in the same process, whose completion flushes /metrics shows.
    """
    settings = app.settings
    tokens = TokenTable.parse(settings.api_tokens)
    metrics = ApiMetrics(cache_s=settings.metrics_cache_s)
    if worker is not None:
        metrics.add_flush_source("completer", worker.completion_flush_sizes)
    hub = ProgressHub(app, min_interval_s=settings.sse_min_interval_s)
    state = ApiState(
        app=app,
        settings=settings,
        tokens=tokens,
        hub=hub,
        metrics=metrics,
        uploads=UploadSlots(settings.api_max_uploads_per_tenant),
    )

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
        # Served by install_offline_docs below, from local assets instead of a CDN.
        docs_url=None,
        redoc_url=None,
        generate_unique_id_function=operation_id,
    )
    api.state.pgbatch = state
    install_error_handlers(api)
    api.include_router(system.router)
    api.include_router(batches.router)
    api.include_router(events.router)
    api.include_router(fleet.router)
    # Each workload the app uses brings its routes (the app's workers run its tasks).
    for workload in app.workloads:
        if workload.router is not None:
            api.include_router(workload.router())
    install_offline_docs(api)
    install_openapi(api)
    static = resources.files("pgbatch.api").joinpath("static")
    api.mount("/static", StaticFiles(directory=str(static)), name="static")
    fixed_paths = frozenset(
        path for route in api.routes if "{" not in (path := getattr(route, "path", "{"))
    )
    # The guard runs inside the metrics middleware, so what it refuses is counted too.
    api.add_middleware(
        RequestGuard,
        settings=settings,
        auth_enabled=tokens.enabled,
        request_scope=app.request_scope,
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
    app: App,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    worker: CompletionFlushes | None = None,
    return_on_signal: bool = False,
) -> uvicorn.Server:
    """Return a uvicorn server for the API of `app` (not started).

    On SIGINT/SIGTERM uvicorn shuts down and then raises the signal again (a
    KeyboardInterrupt for Ctrl-C), which stops a program that serves on the side (the
    demo). With `return_on_signal`, `serve()` just returns: for a program whose work ends
    there (`pgbatch serve`), and then drains what runs beside it.
    """
    check_bind(host, TokenTable.parse(app.settings.api_tokens))
    config = uvicorn.Config(
        create_api(app, worker=worker),
        host=host,
        port=port,
        log_level=log_level,
        # Event streams never end by themselves: give them this long, then close them.
        timeout_graceful_shutdown=2,
        http=_with_header_timeout(app.settings.api_header_timeout_s),
        lifespan="on",
    )
    return _Server(config) if return_on_signal else uvicorn.Server(config)


class _Server(uvicorn.Server):
    """uvicorn's server, ending on SIGINT/SIGTERM without raising the signal again.

    uvicorn re-raises a captured signal once it has shut down, so Ctrl-C in `pgbatch serve`
    became a KeyboardInterrupt (exit 130) that also cancelled the worker running beside it
    mid-drain and left its shard `running`. Here the caller goes on after `serve()` returns.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """Stop serving on SIGINT/SIGTERM (a second SIGINT stops at once); then return."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handled = (signal.SIGINT, signal.SIGTERM)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose client stops sending.

    uvicorn has no such timeout: its keep-alive timer stops at a request's first byte, so
    a client that trickled its headers held a connection forever (500 of them, in issue 9).
    Here a request's head must arrive within `header_timeout_s`; and when the answer went
    out before the body ended (a 413), the rest of the body is read and dropped for as long,
    then the connection is closed ("lingering close": the client still reads the answer).
    """

    header_timeout_s = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start the connection, and the clock for its first request's head."""
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        """Feed h11; time the head of each new request of a kept-alive connection."""
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._cancel(self._head_timer)
            self._head_timer = None

    def on_response_complete(self) -> None:
        """Let uvicorn go on; bound the time spent reading a body nobody will use."""
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self._cancel(self._drain_timer)
            cycle = self.cycle
            self._drain_timer = self.loop.call_later(
                self.header_timeout_s, self._drain_timed_out, cycle
            )

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the clocks, then let uvicorn clean up."""
        self._cancel(self._head_timer)
        self._cancel(self._drain_timer)
        super().connection_lost(exc)

    @staticmethod
    def _cancel(timer: asyncio.TimerHandle | None) -> None:
        if timer is not None:
            timer.cancel()

    def _arm_head_timer(self) -> None:
        self._cancel(self._head_timer)
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()

    def _drain_timed_out(self, cycle: object) -> None:
        self._drain_timer = None
        if self.cycle is cycle and self.conn.their_state is h11.SEND_BODY:
            self.transport.close()


def _with_header_timeout(timeout_s: float) -> type[HeaderTimeoutH11Protocol]:
    """Return the protocol class uvicorn instantiates per connection, with this timeout."""
    return type(
        "HeaderTimeoutH11Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout_s": timeout_s}
    )
