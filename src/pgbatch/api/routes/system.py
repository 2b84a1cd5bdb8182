"""Health, metrics and the dashboard page."""

from __future__ import annotations

import asyncio
import hmac
from importlib import resources

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pgbatch.api.errors import ApiError
from pgbatch.api.guards import is_loopback_host
from pgbatch.api.state import ApiState, api_state

__all__ = ["router"]

router = APIRouter(tags=["system"])

HEALTH_TIMEOUT_S = 2.0


@router.get(
    "/healthz",
    responses={
        200: {"description": "The database answers and its schema is current."},
        503: {"description": "The database is unreachable or its schema is behind."},
    },
)
async def healthz(request: Request) -> JSONResponse:
    """Tell whether the database is reachable and every migration is applied."""
    app = api_state(request).app
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            missing = await app.pending_migrations()
    except (psycopg.Error, TimeoutError) as exc:
        return JSONResponse(
            {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"},
            status_code=503,
        )
    if missing:
        return JSONResponse(
            {"status": "unavailable", "database": "ok", "migrations": f"pending: {missing}"},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok", "migrations": "current"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}},
        401: {"description": "PGBATCH_METRICS_TOKEN is set and the request lacks it."},
        403: {"description": "No PGBATCH_METRICS_TOKEN, and the scraper is not on loopback."},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: shards by state, items finished, takeovers, flushes, latencies."""
    state = api_state(request)
    _check_scraper(request, state)
    body = await state.metrics.scrape(state.app, sse_streams=state.hub.subscribers)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _check_scraper(request: Request, state: ApiState) -> None:
    """Let only the metrics token's holder scrape, or loopback peers when none is set.

    The metrics show every tenant's totals, so a tenant's API token does not open them.
    """
    expected = state.settings.metrics_token
    if expected is None:
        peer = request.client.host if request.client else ""
        if not is_loopback_host(peer):
            raise ApiError(
                403,
                "forbidden",
                "/metrics answers loopback only; set PGBATCH_METRICS_TOKEN to scrape remotely",
            )
        return
    scheme, _, presented = request.headers.get("authorization", "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guess was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        presented.strip().encode(), expected.encode()
    ):
        raise ApiError(
            401,
            "invalid_token",
            "/metrics needs `Authorization: Bearer <PGBATCH_METRICS_TOKEN>`",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _page() -> str:
    return resources.files("pgbatch.api").joinpath("static/index.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The dashboard: a single page fed by the API and its event streams."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
