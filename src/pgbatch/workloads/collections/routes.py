"""The collection-copy workload over HTTP: start a copy, read what it did."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from pgbatch.api.errors import ERRORS, ApiError
from pgbatch.api.media import JSON_BODY
from pgbatch.api.schemas import BatchId, BatchOut, IdempotencyKeyHeader, batch_out
from pgbatch.api.state import Tenant, api_state
from pgbatch.models import BatchStatus
from pgbatch.workloads.collections import copy as copies

__all__ = ["CopyReportOut", "CopyRequest", "router"]

router = APIRouter(prefix="/v1/collections", tags=["collections"])

CollectionId = Annotated[str, Path(min_length=1, max_length=copies.MAX_KEY_CHARS)]


class CopyRequest(BaseModel):
    """Copy `item_ids` (or "all") of the source collection into `target`, deduplicated."""

    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, max_length=copies.MAX_KEY_CHARS)
    item_ids: Literal["all"] | list[Annotated[str, Field(min_length=1)]] = Field(
        description='"all", or the ids of the items to copy.'
    )
    priority: int = Field(default=0, ge=-(2**31), lt=2**31)


class CopyReportOut(BaseModel):
    """What a copy did so far; final once `finished` is true."""

    batch_id: int
    source: str | None
    target: str | None
    status: BatchStatus
    finished: bool
    ranges_done: int
    ranges_total: int
    inserted: int
    already_present: int
    not_in_source: int
    associations_total: int | None = Field(
        description="Associations the copy covers (the source's keys at submit, or the listed"
        " ids); null for a copy submitted before pgbatch recorded it."
    )


@router.post(
    "/{source}/copy",
    status_code=201,
    response_model=BatchOut,
    responses=ERRORS(
        404,
        409,
        415,
        extra={200: {"model": BatchOut, "description": "The copy the Idempotency-Key names."}},
    ),
    dependencies=[JSON_BODY],
)
async def copy_collection(
    request: Request,
    response: Response,
    tenant: Tenant,
    source: CollectionId,
    copy: CopyRequest,
    idempotency_key: IdempotencyKeyHeader = None,
) -> BatchOut:
    """Start a copy: a batch whose shards are key ranges of the source, copied at commit."""
    app = api_state(request).app
    try:
        batch, created = await copies.submit_copy_or_find(
            app,
            source=source,
            target=copy.target,
            item_ids=None if copy.item_ids == "all" else copy.item_ids,
            tenant=tenant,
            idempotency_key=idempotency_key,
            priority=copy.priority,
        )
    except copies.CollectionNotFoundError as exc:
        if exc.field != "source":
            raise  # a target in the body is an invalid request: 422, as for any field
        # The collection in the path is the resource: 404, the same for another tenant's.
        raise ApiError(404, "collection_not_found", str(exc), field="source") from None
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    response.headers["ETag"] = f'"{batch.version}"'
    return batch_out(batch)


@router.get("/copies/{batch_id}", response_model=CopyReportOut, responses=ERRORS(404))
async def copy_report(request: Request, tenant: Tenant, batch_id: BatchId) -> CopyReportOut:
    """Read a copy's progress and its inserted / already-present counts."""
    report = await copies.copy_report(api_state(request).app, batch_id, tenant=tenant)
    return CopyReportOut.model_validate(report, from_attributes=True)
