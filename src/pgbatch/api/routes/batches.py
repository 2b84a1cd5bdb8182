"""Batches: submit (JSON or streamed NDJSON), list, read, update, retry, results."""

from __future__ import annotations

import re
import tempfile
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator, Field, ValidationError

from pgbatch import json_values
from pgbatch.api.errors import ERRORS, ApiError
from pgbatch.api.guards import NDJSON_MEDIA_TYPES, OCTET_STREAM
from pgbatch.api.media import JSON_BODY
from pgbatch.api.schemas import (
    NAME_PATTERN,
    BatchId,
    BatchList,
    BatchOut,
    BatchPatch,
    BatchSubmit,
    ErrorGroupsOut,
    IdempotencyKeyHeader,
    IfMatchHeader,
    InsightOut,
    IntegerText,
    NumberText,
    ResultFormat,
    ResultStatus,
    RetryOut,
    batch_out,
    error_groups_out,
    insight_out,
)
from pgbatch.api.state import ApiState, Tenant, TenantOrQueryToken, api_state
from pgbatch.errors import InvalidBatchError
from pgbatch.export import encode_results
from pgbatch.labels import (
    MAX_METADATA_KEY_CHARS,
    MAX_METADATA_KEYS,
    MAX_METADATA_VALUE_CHARS,
    MAX_NAME_CHARS,
    LabelChange,
    check_metadata,
    check_name,
    parse_metadata_pair,
)
from pgbatch.limits import (
    MAX_LEASE_TTL_S,
    MAX_MAX_ATTEMPTS,
    MAX_RETENTION_S,
    MAX_SHARD_SIZE,
    MIN_LEASE_TTL_S,
)
from pgbatch.models import Batch, BatchFilter, BatchStatus, Outcome

__all__ = ["router", "spool_upload"]

# A page of error groups, and the sample items (with their input) shown per group.
MAX_ERROR_GROUPS = 200
MAX_ERROR_SAMPLES = 20

router = APIRouter(prefix="/v1", tags=["batches"])


NDJSON = "application/x-ndjson"
SpooledFile = tempfile.SpooledTemporaryFile[bytes]
# An upload is kept in memory up to this size, then on disk: small batches never touch
# the disk, and at most PGBATCH_API_MAX_UPLOADS_PER_TENANT x this sits in memory per tenant.
SPOOL_MEMORY_BYTES = 8 * 1024 * 1024
# The spool is parsed this much at a time (about an item's maximum size).
SPOOL_READ_BYTES = 1024 * 1024
SUBMIT_OPTIONS = ("shard_size", "max_attempts", "lease_ttl_s", "priority", "queue", "on_complete")

# Metadata pairs in a query string: `metadata=key:value`, repeated (an array of strings,
# which every OpenAPI client generator can send), split at the first colon.
MetadataPairs = Annotated[
    list[Annotated[str, Field(max_length=MAX_METADATA_KEY_CHARS + 1 + MAX_METADATA_VALUE_CHARS)]]
    | None,
    Query(
        max_length=MAX_METADATA_KEYS,
        description="`key:value`, repeatable: the batch's metadata holds every pair given.",
    ),
]


def _metadata_pairs(pairs: list[str]) -> dict[str, str]:
    """Turn `key:value` strings into metadata (a key given twice: 422, not the last wins)."""
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, value = parse_metadata_pair(pair)
        if key in metadata:
            raise InvalidBatchError(f"metadata: key {key!r} given twice", field="metadata")
        metadata[key] = value
    return check_metadata(metadata)


def _is_number(text: str) -> bool:
    """Tell whether `text` is a non-negative integer in ASCII digits.

    Not `str.isdigit()` alone: it accepts digits that int() refuses ("²"), which a header
    decoded as latin-1 can carry.
    """
    return text.isascii() and text.isdigit()


def _etag(batch: Batch) -> str:
    return f'"{batch.version}"'


def _with_etag(response: Response, batch: Batch) -> BatchOut:
    response.headers["ETag"] = _etag(batch)
    return batch_out(batch)


def _expected_version(if_match: str | None, *, required: bool) -> int | None:
    if if_match is None:
        if required:
            raise ApiError(
                428,
                "precondition_required",
                "send If-Match with the batch's ETag (from GET /v1/batches/{id})",
                field="If-Match",
            )
        return None
    tag = if_match.strip()
    if tag == "*":
        return None
    tag = tag.removeprefix("W/").strip('"')
    if not _is_number(tag):
        raise ApiError(
            412, "stale_version", f"If-Match {if_match!r} is not a batch ETag", field="If-Match"
        )
    return int(tag)


@router.post(
    "/batches",
    status_code=201,
    response_model=BatchOut,
    responses=ERRORS(
        409,
        413,
        415,
        extra={200: {"model": BatchOut, "description": "The batch the Idempotency-Key names."}},
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": BatchSubmit.model_json_schema()},
                # NDJSON is described under application/octet-stream, which every client
                # generator keeps (openapi-python-client drops a body of any media type it
                # does not know, x-ndjson included); the server takes either name.
                OCTET_STREAM: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": "NDJSON: one JSON item per line, with the task and options "
                    f"as query parameters. Send it as {NDJSON} or {OCTET_STREAM}.",
                },
            },
        }
    },
)
async def submit_batch(
    request: Request,
    response: Response,
    tenant: Tenant,
    idempotency_key: IdempotencyKeyHeader = None,
    task: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NAME_PATTERN)] = None,
    shard_size: Annotated[int | None, Query(ge=1, le=MAX_SHARD_SIZE), IntegerText] = None,
    max_attempts: Annotated[int | None, Query(ge=1, le=MAX_MAX_ATTEMPTS), IntegerText] = None,
    lease_ttl_s: Annotated[
        float | None, Query(ge=MIN_LEASE_TTL_S, le=MAX_LEASE_TTL_S), NumberText
    ] = None,
    priority: Annotated[int | None, Query(ge=-(2**31), lt=2**31), IntegerText] = None,
    queue: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NAME_PATTERN)] = None,
    on_complete: Annotated[
        str | None, Query(min_length=1, max_length=200, pattern=NAME_PATTERN)
    ] = None,
    name: Annotated[str | None, Query(max_length=MAX_NAME_CHARS)] = None,
    metadata: MetadataPairs = None,
    retention_s: Annotated[
        str | None,
        Query(
            max_length=40,
            pattern=RETENTION_PATTERN,
            description="Seconds to keep the batch once finished, or 'forever'.",
        ),
    ] = None,
) -> BatchOut:
    """Submit a batch: a JSON body with its items, or NDJSON items streamed to the database."""
    state = api_state(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    query_options = {
        "shard_size": shard_size,
        "max_attempts": max_attempts,
        "lease_ttl_s": lease_ttl_s,
        "priority": priority,
        "queue": queue,
        "on_complete": on_complete,
        "name": name,
        "metadata": None if metadata is None else _metadata_pairs(metadata),
        "retention_s": retention_s,
    }
    items: Any
    if content_type in ("application/json", ""):
        given = [name for name, value in query_options.items() if value is not None]
        if task is not None or given:
            name = "task" if task is not None else given[0]
            raise ApiError(
                422,
                "invalid_request",
                f"{name}: with a JSON body, the task and options go in the body",
                field=name,
            )
        # The request guard already bounded the body (PGBATCH_API_MAX_JSON_BYTES).
        body = await request.body()
        try:
            # orjson, as for NDJSON: one strict JSON parser for items either way (pydantic's
            # accepts NaN and Infinity, and 1e400 as inf: items stored as null, silently);
            # json_values also refuses the integers orjson would round to a float.
            document = json_values.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ApiError(
                422, "invalid_request", f"body: not valid JSON ({exc})", field="body"
            ) from None
        except json_values.JsonValueError as exc:
            raise ApiError(
                422, "invalid_request", str(exc), field=json_values.field_of(exc.path) or "body"
            ) from None
        try:
            submit = BatchSubmit.model_validate(document)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(
                422,
                "invalid_request",
                f"{field}: {first['msg']}",
                field=field,
            ) from None
        if len(submit.items) > state.settings.api_max_items:
            raise _too_many_items(state)
        task_name = submit.task
        options = submit.model_dump(exclude={"task", "items"}, exclude_none=True)
        if "retention_s" in submit.model_fields_set:  # null (keep forever) is a choice too
            options["retention_s"] = submit.retention_s
        items = submit.items
    elif content_type in NDJSON_MEDIA_TYPES:
        if task is None:
            raise ApiError(
                422, "invalid_request", "task: required (a query parameter)", field="task"
            )
        _refuse_internal(state, task)
        options = {k: v for k, v in query_options.items() if v is not None}
        if retention_s is not None:
            options["retention_s"] = _retention_query(retention_s)
        async with state.uploads.slot(tenant):
            with await spool_upload(request, state.settings.api_max_item_bytes) as spool:
                # Only now, with the whole body here, does the submission take a pooled
                # connection: a client trickling its upload holds none (issue 9, item 5).
                batch, created = await state.app.submit_or_find(
                    task,
                    _ndjson_items(spool, state),
                    idempotency_key=idempotency_key,
                    tenant=tenant,
                    **options,
                )
        return await _created(state, response, batch, created)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be application/json or {NDJSON} (or {OCTET_STREAM}, for "
            f"NDJSON too), not {content_type!r}",
            field="Content-Type",
        )
    _refuse_internal(state, task_name)
    batch, created = await state.app.submit_or_find(
        task_name, items, idempotency_key=idempotency_key, tenant=tenant, **options
    )
    return await _created(state, response, batch, created)


# ?retention_s=: seconds (an integer or decimal number), or "forever" (kept, never pruned).
RETENTION_PATTERN = r"^(forever|[0-9]{1,12}(\.[0-9]{1,6})?)$"


def _retention_query(text: str) -> float | None:
    if text == "forever":
        return None
    value = float(text)
    if value > MAX_RETENTION_S:
        raise ApiError(
            422,
            "invalid_request",
            f"retention_s: at most {MAX_RETENTION_S:.0f} seconds, or 'forever'",
            field="retention_s",
        )
    return value


async def _created(state: ApiState, response: Response, batch: Batch, created: bool) -> BatchOut:
    response.status_code = 201 if created else 200
    response.headers["Location"] = f"/v1/batches/{batch.id}"
    out = _with_etag(response, batch)
    # As a GET of it would say: a batch submitted into a paused queue says so at once.
    out.waiting_reason = (await state.app.waiting_reasons([batch])).get(batch.id)
    return out


def _refuse_internal(state: ApiState, task_name: str) -> None:
    """Refuse a task only a workload submits, after its own checks (e.g. a collection copy)."""
    spec = state.app.tasks.get(task_name)
    if spec is not None and spec.internal:
        raise ApiError(
            422,
            "internal_task",
            f"task {task_name!r} is internal: submit it through its own route",
            field="task",
        )


def _too_many_items(state: ApiState) -> ApiError:
    limit = state.settings.api_max_items
    return ApiError(
        413, "too_many_items", f"a batch holds at most {limit} items (limit {limit})", field="items"
    )


def _item_too_large(line_no: int, max_line: int) -> ApiError:
    return ApiError(
        413,
        "item_too_large",
        f"line {line_no}: an item may be at most {max_line} bytes (limit {max_line})",
        field="items",
    )


async def spool_upload(request: Request, max_line: int) -> SpooledFile:
    """Receive the whole upload into memory, then a temporary file past SPOOL_MEMORY_BYTES.

    The request guard bounds its size (PGBATCH_API_MAX_UPLOAD_BYTES) and its read timeouts;
    a line that grows past `max_line` is refused as it arrives, not spooled to its end.
    """
    spool: SpooledFile = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
    line_no, line_bytes = 1, 0
    try:
        async for chunk in request.stream():
            # Counting newlines runs at memory speed; the full check is the parse's.
            newlines = chunk.count(b"\n")
            if newlines:
                line_no += newlines
                line_bytes = len(chunk) - chunk.rfind(b"\n") - 1
            else:
                line_bytes += len(chunk)
            if line_bytes > max_line:
                raise _item_too_large(line_no, max_line)
            # A write to a temporary file lands in the page cache: microseconds, not worth
            # a thread hop per chunk.
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


async def _ndjson_items(spool: SpooledFile, state: ApiState) -> AsyncIterator[Any]:
    """Parse the spooled NDJSON a chunk at a time: the batch is never held in memory."""
    max_items = state.settings.api_max_items
    max_line = state.settings.api_max_item_bytes
    buffer = b""
    line_no = 0
    count = 0

    def parse(line: bytes) -> Any:
        if len(line) > max_line:
            raise _item_too_large(line_no, max_line)
        try:
            return json_values.loads(line)
        except orjson.JSONDecodeError as exc:
            raise InvalidBatchError(
                f"line {line_no}: not valid JSON ({exc})", field="items"
            ) from None
        except json_values.JsonValueError as exc:
            path = ("items", count - 1, *exc.path)  # count - 1: this item's seq
            raise InvalidBatchError(
                f"line {line_no}: {exc}", field=json_values.field_of(path)
            ) from None

    while chunk := spool.read(SPOOL_READ_BYTES):
        buffer += chunk
        if b"\n" not in buffer:
            if len(buffer) > max_line:
                line_no += 1
                parse(buffer)  # raises: the line is already too long
            continue
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line_no += 1
            if line.strip():
                count += 1
                if count > max_items:
                    raise _too_many_items(state)
                yield parse(line)
    if buffer.strip():
        line_no += 1
        count += 1
        if count > max_items:
            raise _too_many_items(state)
        yield parse(buffer)


# What the OpenAPI document promises for created_after/before (format: date-time).
_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})"
)


def _rfc3339(value: object) -> object:
    """Refuse what pydantic would also read as a datetime (a number of seconds since the
    epoch, a bare date, a time without its offset) but the API does not document."""
    if isinstance(value, str) and not _RFC3339.fullmatch(value):
        raise ValueError("expected an RFC 3339 date-time with an offset, e.g. 2024-05-01T12:00:00Z")
    return value


@router.get("/batches", response_model=BatchList, responses=ERRORS())
async def list_batches(
    request: Request,
    tenant: Tenant,
    status: BatchStatus | None = None,
    task: Annotated[str | None, Query(min_length=1, max_length=200, pattern=NAME_PATTERN)] = None,
    name: Annotated[
        str | None,
        Query(max_length=MAX_NAME_CHARS, description="Only batches of exactly this name."),
    ] = None,
    metadata: MetadataPairs = None,
    created_after: Annotated[datetime | None, BeforeValidator(_rfc3339)] = None,
    created_before: Annotated[datetime | None, BeforeValidator(_rfc3339)] = None,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page.", max_length=40)
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500), IntegerText] = 50,
) -> BatchList:
    """List the tenant's batches, newest first, a page at a time."""
    before_id = None
    if cursor is not None:
        if not _is_number(cursor) or len(cursor) > 18:
            raise ApiError(
                422, "invalid_request", "cursor: not a cursor from this API", field="cursor"
            )
        before_id = int(cursor)
    where = BatchFilter(
        tenant=tenant,
        status=status,
        task=task,
        name=None if name is None else check_name(name),
        metadata=None if metadata is None else _metadata_pairs(metadata),
        created_after=created_after,
        created_before=created_before,
        before_id=before_id,
    )
    batches = await api_state(request).app.list_batches(where, limit=limit)
    next_cursor = str(batches[-1].id) if len(batches) == limit else None
    reasons = await api_state(request).app.waiting_reasons(batches)
    outs = [batch_out(b) for b in batches]
    for out in outs:
        out.waiting_reason = reasons.get(out.id)
    return BatchList(batches=outs, next_cursor=next_cursor)


@router.get("/batches/{batch_id}", response_model=BatchOut, responses=ERRORS(404))
async def get_batch(
    request: Request, response: Response, tenant: Tenant, batch_id: BatchId
) -> BatchOut:
    """Read a batch; its ETag is its version, for If-Match on updates."""
    app = api_state(request).app
    batch = await app.get_batch(batch_id, tenant=tenant)
    out = _with_etag(response, batch)
    out.waiting_reason = (await app.waiting_reasons([batch])).get(batch.id)
    return out


@router.patch(
    "/batches/{batch_id}",
    response_model=BatchOut,
    responses=ERRORS(404, 409, 412, 415, 428),
    dependencies=[JSON_BODY],
)
async def update_batch(
    request: Request,
    response: Response,
    tenant: Tenant,
    batch_id: BatchId,
    patch: BatchPatch,
    if_match: IfMatchHeader = None,
) -> BatchOut:
    """Change the name, metadata, priority and/or cancel (`"status": "cancelled"`); needs
    If-Match."""
    expected = _expected_version(if_match, required=True)
    given = patch.model_fields_set
    if patch.priority is None and patch.status is None and not given & {"name", "metadata"}:
        raise ApiError(
            422,
            "invalid_request",
            "body: nothing to change (name, metadata, priority or status)",
            field="body",
        )
    labels = None
    if given & {"name", "metadata"}:
        metadata = patch.metadata if patch.metadata is not None else {}
        labels = LabelChange(
            set_name="name" in given,
            name=patch.name,
            metadata=metadata if "metadata" in given else None,
        )
    batch = await api_state(request).app.update(
        batch_id,
        priority=patch.priority,
        cancel=patch.status == "cancelled",
        labels=labels,
        expected_version=expected,
        tenant=tenant,
    )
    return _with_etag(response, batch)


@router.post("/batches/{batch_id}/cancel", response_model=BatchOut, responses=ERRORS(404, 409, 412))
async def cancel_batch(
    request: Request,
    response: Response,
    tenant: Tenant,
    batch_id: BatchId,
    if_match: IfMatchHeader = None,
) -> BatchOut:
    """Cancel the batch (If-Match optional): queued shards stop, running ones at their next
    heartbeat. A batch that has already ended answers 409."""
    expected = _expected_version(if_match, required=False)
    batch = await api_state(request).app.update(
        batch_id, cancel=True, expected_version=expected, tenant=tenant
    )
    return _with_etag(response, batch)


@router.post("/batches/{batch_id}/retry", response_model=RetryOut, responses=ERRORS(404, 409, 412))
async def retry_batch(
    request: Request,
    response: Response,
    tenant: Tenant,
    batch_id: BatchId,
    if_match: IfMatchHeader = None,
) -> RetryOut:
    """Re-queue the dead shards and the shards with failed items (If-Match optional)."""
    app = api_state(request).app
    expected = _expected_version(if_match, required=False)
    requeued = await app.retry(batch_id, expected_version=expected, tenant=tenant)
    batch = await app.get_batch(batch_id, tenant=tenant)
    response.headers["ETag"] = _etag(batch)
    return RetryOut(requeued_shards=requeued, batch=batch_out(batch))


@router.get("/batches/{batch_id}/errors", response_model=ErrorGroupsOut, responses=ERRORS(404))
async def batch_errors(
    request: Request,
    tenant: Tenant,
    batch_id: BatchId,
    limit: Annotated[int, Query(ge=1, le=MAX_ERROR_GROUPS), IntegerText] = 20,
    samples: Annotated[int, Query(ge=0, le=MAX_ERROR_SAMPLES), IntegerText] = 3,
) -> ErrorGroupsOut:
    """The batch's failed items grouped by error text, largest group first, with samples."""
    batch, groups, total = await api_state(request).app.error_groups(
        batch_id, tenant=tenant, limit=limit, samples=samples
    )
    return error_groups_out(batch, groups, total)


@router.get("/batches/{batch_id}/insight", response_model=InsightOut, responses=ERRORS(404))
async def batch_insight(request: Request, tenant: Tenant, batch_id: BatchId) -> InsightOut:
    """The batch with its shard states, throughput over time and error samples."""
    batch, insight = await api_state(request).app.insight(batch_id, tenant=tenant)
    return insight_out(batch, insight)


@router.get(
    "/batches/{batch_id}/results",
    responses=ERRORS(
        404,
        extra={
            200: {
                "description": "One result per item in order: NDJSON, or CSV (Accept: text/csv, "
                "or ?format=csv).",
                "content": {
                    NDJSON: {"schema": {"type": "string"}},
                    "text/csv": {"schema": {"type": "string"}},
                },
            }
        },
    ),
    response_class=StreamingResponse,
)
async def batch_results(
    request: Request,
    tenant: TenantOrQueryToken,
    batch_id: BatchId,
    status: Annotated[
        ResultStatus, Query(description="Only failures, or only successes.")
    ] = ResultStatus.ALL,
    format: Annotated[
        ResultFormat | None,
        Query(description="Overrides Accept, so that a plain link can download CSV."),
    ] = None,
    accept: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Stream the batch's results a page at a time (memory stays flat for any size)."""
    as_csv = format == "csv" if format is not None else "text/csv" in (accept or "")
    rows = api_state(request).app.results(batch_id, errors_only=status == "error", tenant=tenant)
    # The first row is read here: results() looks the batch up first, so an unknown (or
    # another tenant's) batch is a 404 before the stream starts.
    first = await anext(rows, None)

    async def selected() -> AsyncIterator[tuple[int, Outcome]]:
        row = first
        while row is not None:
            if status != "ok" or row[1].ok:
                yield row
            row = await anext(rows, None)

    # One encoder with `pgbatch results` (pgbatch.export): the same lines and rows.
    if as_csv:
        return StreamingResponse(
            encode_results(selected(), "csv"),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="batch-{batch_id}.csv"'},
        )
    return StreamingResponse(encode_results(selected(), "ndjson"), media_type=NDJSON)
