"""A real API server per test: uvicorn on a free loopback port, an App on the test's
database, and (by default) a worker in the same event loop."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest_asyncio

import pgbatch
from pgbatch.api.auth import new_token
from pgbatch.api.server import server as api_server
from tests.apps.api_app import build_app
from tests.conftest import settings_for


@dataclass
class RunningApi:
    """A started API: its URL, its App, the gate of the `gated` task, and tokens by tenant."""

    base_url: str
    app: pgbatch.App
    gate: asyncio.Event
    tokens: dict[str, str]
    uvicorn: Any

    def client(self, tenant: str | None = None, **kwargs: Any) -> httpx.AsyncClient:
        """Return an HTTP client for this API, authenticated as `tenant` when tokens are on."""
        headers = dict(kwargs.pop("headers", {}))
        if tenant is not None:
            headers["Authorization"] = f"Bearer {self.tokens[tenant]}"
        return httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=kwargs.pop("timeout", 30), **kwargs
        )


StartApi = Callable[..., AbstractAsyncContextManager[RunningApi]]


@pytest_asyncio.fixture
async def start_api(database_url: str) -> StartApi:
    """Return `start_api(tenants=(), worker=True, **settings)`: an async context manager."""

    @contextlib.asynccontextmanager
    async def start(
        tenants: tuple[str, ...] = (), worker: bool = True, **overrides: Any
    ) -> AsyncIterator[RunningApi]:
        tokens: dict[str, str] = {}
        entries = []
        for tenant in tenants:
            token, entry = new_token(tenant)
            tokens[tenant] = token
            entries.append(entry)
        if entries:
            overrides["api_tokens"] = ",".join(entries)
        overrides.setdefault("sse_min_interval_s", 0.05)
        # Tests read /metrics right after what they count: no cached scrapes, unless asked.
        overrides.setdefault("metrics_cache_s", 0)
        app, gate = build_app(settings_for(database_url, **overrides))
        work = app.worker(concurrency=8) if worker else None
        http = api_server(app, host="127.0.0.1", port=0, log_level="warning", worker=work)
        serving = asyncio.create_task(http.serve())
        while not http.started:
            if serving.done():
                serving.result()  # raises why it could not start
            await asyncio.sleep(0.01)
        port = http.servers[0].sockets[0].getsockname()[1]
        working = asyncio.create_task(work.run()) if work is not None else None
        try:
            yield RunningApi(f"http://127.0.0.1:{port}", app, gate, tokens, http)
        finally:
            gate.set()
            if work is not None and working is not None:
                work.request_stop()
                await working
            http.should_exit = True
            await serving
            await app.close()

    return start


@pytest_asyncio.fixture
async def api(start_api: StartApi) -> AsyncIterator[RunningApi]:
    """Return a running API without authentication, with a worker."""
    async with start_api() as running:
        yield running
