"""Document ingest: one document per call, group-committed by the writer (issue 3)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from pgbatch.api.auth import DEFAULT_TENANT
from pgbatch.api.errors import ApiError
from pgbatch.api.routes.batches import ERRORS
from pgbatch.api.state import ApiState, Tenant, api_state
from pgbatch.writer import DocumentWriter, create_document_tables, document_item
from pgbatch.writer.documents import DocumentRow
from pgbatch.writer.errors import InvalidDocumentError, WriteFailedError, WriterClosedError
from pgbatch.writer.models import WriteItem, WriteOutcome, WriteStatus

__all__ = ["DocumentIn", "DocumentOut", "router", "write_document"]

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


def _scoped(identity: dict[str, str | int], tenant: str) -> dict[str, str | int]:
    # Keys are global; with several tenants the tenant is part of every identity, so one
    # tenant's document can never overwrite, or be referenced by, another's.
    if tenant == DEFAULT_TENANT:
        return identity
    claimed = identity.get("tenant", tenant)
    if claimed != tenant:
        raise ApiError(
            422, "invalid_document", "identity.tenant names another tenant", field="identity"
        )
    return {**identity, "tenant": tenant}


@router.post(
    "/documents",
    status_code=201,
    response_model=DocumentOut,
    responses=ERRORS(
        409,
        extra={503: {"description": "The write could not be committed; posting again is safe."}},
    ),
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
    identity = _scoped(document.identity, tenant)
    references = [_scoped(ref, tenant) for ref in document.references]
    try:
        item = document_item(
            identity,
            document.body,
            references=references,
            partition=document.partition or (None if tenant == DEFAULT_TENANT else tenant),
        )
    except InvalidDocumentError as exc:
        raise ApiError(422, "invalid_document", str(exc), field="identity") from None
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
    try:
        return DocumentIn.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid_request", f"{field}: {first['msg']}", field=field) from None
