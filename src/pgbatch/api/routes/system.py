"""Health, metrics and the dashboard page."""

from __future__ import annotations

import asyncio
from importlib import resources

import psycopg
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pgbatch.api.state import api_state
from pgbatch.db.migrations import applied_versions, available_migrations

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
    wanted = {m.version for m in available_migrations()}
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            async with app.db.connection() as conn:
                applied = await applied_versions(conn)
    except (psycopg.Error, TimeoutError) as exc:
        return JSONResponse(
            {"status": "unavailable", "database": f"unreachable: {type(exc).__name__}"},
            status_code=503,
        )
    missing = sorted(wanted - applied)
    if missing:
        return JSONResponse(
            {"status": "unavailable", "database": "ok", "migrations": f"pending: {missing}"},
            status_code=503,
        )
    return JSONResponse({"status": "ok", "database": "ok", "migrations": "current"})


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: shards by state, items finished, takeovers, flushes, latencies."""
    state = api_state(request)
    body = await state.metrics.render(state.app, sse_streams=state.hub.subscribers)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _page() -> str:
    return resources.files("pgbatch.api").joinpath("static/index.html").read_text("utf-8")


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The dashboard: a single page fed by the API and its event streams."""
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
