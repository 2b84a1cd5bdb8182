"""The OpenAPI document, shaped for client generators (openapi-python-client and the like).

- Operation ids are the route functions' names (`submit_batch`), not FastAPI's
  `submit_batch_v1_batches_post`: they become the generated functions' names.
- A schema written inline by a route (a request body it reads itself, an event stream's
  event) is moved to `components/schemas` under its title, so a generator names its class
  after it instead of after the operation.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

__all__ = ["install_openapi", "operation_id"]

_INLINE_DEFS = "#/$defs/"
_COMPONENTS = "#/components/schemas/"


def operation_id(route: APIRoute) -> str:
    """Return a route's operation id: its function's name, which is unique in the API."""
    return route.name


def install_openapi(api: FastAPI) -> None:
    """Make `api.openapi()` return the document with its inline schemas named."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = build()
            name_inline_schemas(document)
            api.openapi_schema = document
        return api.openapi_schema

    api.openapi = openapi  # type: ignore[method-assign]


def name_inline_schemas(document: dict[str, Any]) -> None:
    """Move every titled inline object schema of a body or response into the components."""
    components: dict[str, Any] = document.setdefault("components", {}).setdefault("schemas", {})
    for operations in document.get("paths", {}).values():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            bodies = [operation.get("requestBody") or {}]
            bodies += list(operation.get("responses", {}).values())
            for body in bodies:
                for media in body.get("content", {}).values():
                    for key in ("schema", "itemSchema"):  # itemSchema: an event of a stream
                        if _is_named_inline(media.get(key)):
                            media[key] = _hoist(media[key], components)


def _is_named_inline(schema: Any) -> bool:
    return (
        isinstance(schema, dict)
        and "$ref" not in schema
        and schema.get("type") == "object"
        and isinstance(schema.get("title"), str)
    )


def _hoist(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, str]:
    """Put `schema` (and its `$defs`) in `components`; return the reference to it."""
    schema = _rewrite_refs(dict(schema))
    for name, definition in schema.pop("$defs", {}).items():
        components.setdefault(name, definition)
    name = schema["title"]
    existing = components.setdefault(name, schema)
    if existing != schema:
        raise ValueError(f"two different OpenAPI schemas are both named {name!r}")
    return {"$ref": _COMPONENTS + name}


def _rewrite_refs(value: Any) -> Any:
    # pydantic's model_json_schema() points at its own $defs; the components hold them now.
    if isinstance(value, dict):
        return {
            key: (
                _COMPONENTS + item.removeprefix(_INLINE_DEFS)
                if key == "$ref" and isinstance(item, str) and item.startswith(_INLINE_DEFS)
                else _rewrite_refs(item)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_rewrite_refs(item) for item in value]
    return value
