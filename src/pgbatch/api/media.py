"""The Content-Type check of the routes that take a JSON body: anything else is a 415."""

from __future__ import annotations

from fastapi import Depends, Request

from pgbatch.api.errors import ApiError
from pgbatch.api.state import Tenant

__all__ = ["JSON_BODY", "is_json", "require_json"]


def is_json(content_type: str | None) -> bool:
    """Tell whether a Content-Type names JSON (`application/json`, `application/*+json`).

    No Content-Type at all counts as JSON, as POST /v1/batches has always read it.
    """
    media = (content_type or "").split(";")[0].strip().lower()
    if not media:
        return True
    kind, _, subtype = media.partition("/")
    return kind == "application" and (subtype == "json" or subtype.endswith("+json"))


async def require_json(request: Request, _: Tenant) -> None:
    """Refuse a request body that is not declared as JSON, before anything parses it."""
    # `async def`: FastAPI runs a plain `def` dependency in a worker thread (see state.py).
    # It depends on the tenant so that a request without a valid token gets its 401 first
    # (FastAPI resolves the tenant once per request, for this and the route alike).
    content_type = request.headers.get("content-type")
    if not is_json(content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json, not {content_type!r}",
            field="Content-Type",
        )


# For a route's `dependencies=[...]`: it runs before FastAPI validates the body.
JSON_BODY = Depends(require_json)
