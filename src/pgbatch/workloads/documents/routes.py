"""Document ingest: one document per call, group-committed by the writer (issue 3)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from pgbatch import json_values
from pgbatch.api.auth import DEFAULT_TENANT
from pgbatch.api.errors import ERRORS, ApiError
from pgbatch.api.media import JSON_BODY
from pgbatch.api.state import ApiState, Tenant, api_state
from pgbatch.workloads.documents.writer import (
    DocumentRow,
    DocumentWriter,
    create_document_tables,
    document_item,
    get_document,
)
from pgbatch.writer.errors import InvalidDocumentError, WriteFailedError, WriterClosedError
from pgbatch.writer.models import WriteItem, WriteOutcome, WriteStatus

__all__ = ["DocumentIn", "DocumentOut", "StoredDocumentOut", "router", "write_document"]

router = APIRouter(prefix="/v1", tags=["documents"])

WRITER_KEY = "documents"
LOCK_KEY = "documents.start"

IdentityIn = Annotated[
    # Strict: true would otherwise become 1, and "1" and 1 are different identities.
    dict[str, StrictStr | StrictInt],
    Field(description='A natural identity with a "type", e.g. {"type": "student", "id": "S-1"}.'),
]


class DocumentIn(BaseModel):
    """One document: its identity, its body (a JSON object) and the documents it references."""

    model_config = ConfigDict(extra="forbid")

    identity: IdentityIn
    body: dict[str, Any]
    references: list[IdentityIn] = Field(default_factory=list, max_length=10_000)
    partition: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Documents that reference each other when posted together must share it.",
    )


class DocumentOut(BaseModel):
    """A committed document: durable when this is returned."""

    key: str
    identity: dict[str, str | int]


class StoredDocumentOut(BaseModel):
    """A document as stored: its identity (with its tenant), body and references."""

    key: str
    identity: dict[str, str | int]
    body: dict[str, Any]
    references: list[dict[str, str | int]]


async def _writer(state: ApiState) -> DocumentWriter:
    # Started on first use: a server that never ingests documents creates no tables.
    writer = state.extras.get(WRITER_KEY)
    if isinstance(writer, DocumentWriter):
        return writer
    lock = state.extras.setdefault(LOCK_KEY, asyncio.Lock())
    assert isinstance(lock, asyncio.Lock)
    async with lock:
        writer = state.extras.get(WRITER_KEY)
        if isinstance(writer, DocumentWriter):
            return writer
        await create_document_tables(state.app.db)
        started = DocumentWriter(
            state.app.db,
            max_batch=state.settings.writer_max_batch,
            max_delay_ms=state.settings.writer_max_delay_ms,
        )
        started.start()
        state.extras[WRITER_KEY] = started
        state.metrics.add_writer(lambda: started.stats)
        return started


def _scoped(identity: dict[str, str | int], tenant: str, field: str) -> dict[str, str | int]:
    # Keys are global, so the caller's tenant is part of every identity: a "tenant" member
    # for every tenant but the default one, whose identities never have one. A "tenant"
    # from the body is refused unless it repeats the caller's own: otherwise the default
    # tenant (no token, or a token whose tenant is named "default") could post
    # {"tenant": "acme"} and overwrite or reference acme's documents (issue 9).
    if "tenant" in identity and (tenant == DEFAULT_TENANT or identity["tenant"] != tenant):
        raise ApiError(
            422,
            "invalid_document",
            f"{field}.tenant: a document belongs to the caller's tenant; "
            'leave "tenant" out of identities',
            field=f"{field}.tenant",
        )
    if tenant == DEFAULT_TENANT:
        return identity
    return {**identity, "tenant": tenant}


@router.post(
    "/documents",
    status_code=201,
    response_model=DocumentOut,
    responses=ERRORS(
        409,
        415,
        extra={503: {"description": "The write could not be committed; posting again is safe."}},
    ),
    dependencies=[JSON_BODY],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": DocumentIn.model_json_schema()}},
        }
    },
)
async def post_document(request: Request, tenant: Tenant) -> Response:
    """Write one document (upsert by identity); 201 only after its transaction committed."""
    state = api_state(request)
    writer = await _writer(state)
    return await write_document(request, tenant, writer.write)


Write = Callable[[WriteItem[uuid.UUID, DocumentRow]], Awaitable[WriteOutcome[uuid.UUID]]]


async def write_document(request: Request, tenant: str, write: Write) -> Response:
    """Parse one posted document, `write` it, and answer (the route's body, reusable).

    benchmarks/ingest_http.py serves its one-transaction-per-document baseline through
    this same function, so that both sides pay the same HTTP path.
    """
    # The body is parsed and the answer encoded here rather than by FastAPI: this route
    # is called once per document, and the framework's generic path was most of its CPU.
    state = api_state(request)
    document = _parse(await request.body())
    identity = _scoped(document.identity, tenant, "identity")
    references = [
        _scoped(ref, tenant, f"references.{n}") for n, ref in enumerate(document.references)
    ]
    try:
        item = document_item(
            identity,
            document.body,
            references=references,
            partition=document.partition or (None if tenant == DEFAULT_TENANT else tenant),
        )
    except InvalidDocumentError as exc:
        raise ApiError(422, "invalid_document", str(exc), field=exc.field or "identity") from None
    try:
        outcome = await write(item)
    except (WriteFailedError, WriterClosedError) as exc:
        raise ApiError(503, "write_failed", str(exc), headers={"Retry-After": "1"}) from None
    state.metrics.writer_items.labels(str(outcome.status)).inc()
    if outcome.status is WriteStatus.WRITTEN:
        return Response(
            orjson.dumps({"key": str(item.key), "identity": identity}),
            status_code=201,
            media_type="application/json",
            headers={"Location": f"/v1/documents/{item.key}"},
        )
    if outcome.status is WriteStatus.CONFLICT:
        raise ApiError(409, "conflict", outcome.reason or "write conflict; post again")
    if outcome.missing or outcome.blocked_by:
        raise ApiError(
            409,
            "missing_references",
            outcome.reason or "some references do not exist",
            field="references",
            details={
                "missing": sorted(str(k) for k in outcome.missing),
                "blocked_by": sorted(str(k) for k in outcome.blocked_by),
            },
        )
    raise ApiError(422, "invalid_document", outcome.reason or "the document was rejected")


def _parse(body: bytes) -> DocumentIn:
    # orjson, as for batch items: pydantic's JSON parser reads NaN, Infinity and 1e400 as
    # floats that would be stored as null; json_values refuses integers beyond 64 bits.
    try:
        parsed = json_values.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(
            422, "invalid_request", f"body: not valid JSON ({exc})", field="body"
        ) from None
    except json_values.JsonValueError as exc:
        field = json_values.field_of(exc.path) or "body"
        raise ApiError(422, "invalid_request", str(exc), field=field) from None
    try:
        return DocumentIn.model_validate(parsed)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field=field) from None


@router.get(
    "/documents/{key}",
    response_model=StoredDocumentOut,
    responses=ERRORS(404),
)
async def get_stored_document(request: Request, tenant: Tenant, key: uuid.UUID) -> Response:
    """Read one of the tenant's documents (the Location of its POST); 404 for another's."""
    state = api_state(request)
    stored = await get_document(state.app.db, key, tenant=tenant, default_tenant=DEFAULT_TENANT)
    if stored is None:
        # The same answer for a key nobody posted and for another tenant's document.
        raise ApiError(404, "document_not_found", f"no document {key}")
    return Response(
        orjson.dumps(
            {
                "key": str(stored.key),
                "identity": stored.identity,
                "body": stored.body,
                "references": stored.references,
            }
        ),
        media_type="application/json",
    )
