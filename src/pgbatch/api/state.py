"""What every request handler of one API process shares, and the tenant of a request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pgbatch.api.auth import DEFAULT_TENANT, TokenTable
from pgbatch.api.errors import ApiError
from pgbatch.api.guards import UploadSlots
from pgbatch.api.live import ProgressHub
from pgbatch.api.metrics import ApiMetrics
from pgbatch.app import App
from pgbatch.config import Settings

__all__ = ["ApiState", "Tenant", "TenantOrQueryToken", "api_state"]


@dataclass
class ApiState:
    """The app, its settings and the per-process services the routes use."""

    app: App
    settings: Settings
    tokens: TokenTable
    hub: ProgressHub
    metrics: ApiMetrics
    uploads: UploadSlots
    extras: dict[str, object] = field(default_factory=dict)


def api_state(request: Request) -> ApiState:
    """Return the state of the API serving `request`."""
    state: ApiState = request.app.state.pgbatch
    return state


_bearer = HTTPBearer(auto_error=False, description="An API token (`pgbatch token new`).")


def _tenant_for(state: ApiState, token: str | None) -> str:
    if not state.tokens.enabled:
        return DEFAULT_TENANT
    if not token:
        raise ApiError(
            401,
            "unauthenticated",
            "this server needs an API token: send `Authorization: Bearer <token>`",
            field="Authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    tenant = state.tokens.tenant_of(token)
    if tenant is None:
        raise ApiError(
            401,
            "invalid_token",
            "the API token is not valid",
            field="Authorization",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
    return tenant


# Both are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker
# thread, a hop that cost 7-10% of the server's CPU per request (benchmarks/ingest_http.py).
async def tenant(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> str:
    """Return the tenant of the request's bearer token ('default' without authentication)."""
    return _tenant_for(api_state(request), credentials.credentials if credentials else None)


async def tenant_or_query_token(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    access_token: Annotated[
        str | None,
        Query(description="The API token, for clients that cannot send headers (EventSource)."),
    ] = None,
) -> str:
    """Like `tenant`, also accepting `?access_token=` (browsers' EventSource sends no headers)."""
    token = credentials.credentials if credentials else access_token
    return _tenant_for(api_state(request), token)


Tenant = Annotated[str, Depends(tenant)]
TenantOrQueryToken = Annotated[str, Depends(tenant_or_query_token)]
