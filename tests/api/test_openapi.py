"""The OpenAPI document is shaped for client generators: operation ids, named schemas, an
enum of every error code the API answers with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pgbatch.api.error_codes import ErrorCode
from pgbatch.api.server import create_api
from pgbatch.config import Settings
from tests.apps.api_app import build_app

SRC = Path(__file__).resolve().parents[2] / "src" / "pgbatch"
# A code the API answers with, as the sources write it: ApiError(404, "batch_not_found", ...)
# and the error handlers' _respond(409, "invalid_state", ...) / the guard's _error(...).
CODE_IN_SOURCE = re.compile(
    r"\b(?:ApiError|_respond|_error)\(\s*(?:\d+|[A-Z_]+|\w+\.\w+),\s*\"([a-z_]+)\"", re.S
)
# The framework's own errors, mapped in api/errors.py's http_error handler.
FRAMEWORK_CODES = {"not_found", "method_not_allowed", "http_error"}
# Modules that speak another API's error shape (the fake OpenAI upstream), not ours.
OTHER_APIS = {"fake_upstream.py"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    app, _ = build_app(Settings())
    return create_api(app).openapi()


def _operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, operation)
        for path, operations in document["paths"].items()
        for method, operation in operations.items()
    ]


def test_operation_ids_are_the_route_names(document: dict[str, Any]) -> None:
    ids = {f"{m} {p}": op["operationId"] for m, p, op in _operations(document)}
    assert ids["POST /v1/batches"] == "submit_batch"
    assert ids["POST /v1/batches/{batch_id}/cancel"] == "cancel_batch"
    assert ids["GET /v1/batches/{batch_id}/results"] == "batch_results"
    assert len(set(ids.values())) == len(ids), ids
    for operation_id in ids.values():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", operation_id), operation_id
        assert "_v1_" not in operation_id and not operation_id.endswith(("_get", "_post"))


def test_bodies_and_responses_name_their_schemas(document: dict[str, Any]) -> None:
    for method, path, operation in _operations(document):
        bodies = [operation.get("requestBody") or {}, *operation["responses"].values()]
        for body in bodies:
            for media_type, media in body.get("content", {}).items():
                for key in ("schema", "itemSchema"):
                    schema = media.get(key)
                    if isinstance(schema, dict) and schema.get("type") == "object":
                        raise AssertionError(f"{method} {path} {media_type}: inline {schema}")
    schemas = document["components"]["schemas"]
    assert {"BatchSubmit", "DocumentIn", "BatchEvent", "ResultStatus", "ErrorCode"} <= set(schemas)
    # pydantic's $defs went to the components too: every reference resolves.
    text = repr(document)
    for name in re.findall(r"#/components/schemas/(\w+)", text):
        assert name in schemas, name
    assert "#/$defs/" not in text


def test_the_ndjson_upload_is_described_under_a_media_type_generators_keep(
    document: dict[str, Any],
) -> None:
    content = document["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/BatchSubmit"}
    upload = content["application/octet-stream"]
    assert upload["schema"] == {"type": "string", "format": "binary"}
    assert "application/x-ndjson" in upload["description"]


def test_every_error_code_the_api_answers_with_is_in_the_enum(document: dict[str, Any]) -> None:
    answered = set(FRAMEWORK_CODES)
    for path in SRC.rglob("*.py"):
        if path.name not in OTHER_APIS:
            answered |= set(CODE_IN_SOURCE.findall(path.read_text()))
    assert "batch_not_found" in answered and "missing_references" in answered  # the scan works
    assert answered - {c.value for c in ErrorCode} == set(), "add these to api/error_codes.py"
    code = document["components"]["schemas"]["ErrorDetail"]["properties"]["code"]
    assert code == {"$ref": "#/components/schemas/ErrorCode"}
    assert set(document["components"]["schemas"]["ErrorCode"]["enum"]) == {
        c.value for c in ErrorCode
    }
