"""The OpenAI Files and Batches API under /openai/v1, for the `openai` client as it is.

Tokens and tenancy are the rest of the API's (`Authorization: Bearer <token>`); errors
come in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 400 for
what our own API answers 422, so the `openai` package raises its usual exceptions. Every
route's errors pass through `OpenAIRoute`, which maps them as the API's handlers do
(a database away is still 503 with Retry-After) and then reshapes the body.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from pgbatch.api.guards import ERROR_SHAPES, MULTIPART_UPLOAD_PATHS
from pgbatch.api.state import Tenant, api_state
from pgbatch.workloads.llm.batch_api import service
from pgbatch.workloads.llm.batch_api.service import BatchApiError

__all__ = ["PREFIX", "OpenAIRoute", "openai_error", "router"]

PREFIX = "/openai/v1"
# OpenAI's page sizes: files list up to 10,000 per page, batches up to 100.
MAX_FILE_PAGE = 10_000
MAX_BATCH_PAGE = 100
# An upload is one file and a purpose; a form of more parts is not the Files API's.
MAX_FORM_FIELDS = 8

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def openai_error(
    status: int,
    code: str | None,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Return an error in OpenAI's shape (a 422 of our API is OpenAI's 400)."""
    status = 400 if status == 422 else status
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


async def _reshaped(request: Request, exc: Exception) -> Response:
    """Answer `exc` as the API's handlers would, in OpenAI's error shape."""
    if isinstance(exc, BatchApiError):
        return openai_error(exc.status, exc.code, exc.message, exc.param)
    handlers = request.app.exception_handlers
    handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        raise exc
    answer: Response = await handler(request, exc)
    try:
        error = orjson.loads(bytes(answer.body))["error"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return answer
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length",)}
    headers.pop("content-type", None)
    return openai_error(
        answer.status_code, error.get("code"), error.get("message", ""), error.get("field"), headers
    )


class OpenAIRoute(APIRoute):
    """A route whose errors, FastAPI's validation included, answer in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap FastAPI's handler: any exception becomes the mapped, reshaped answer."""
        handler = super().get_route_handler()

        async def shaped(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                return await _reshaped(request, exc)

        return shaped


router = APIRouter(prefix=PREFIX, tags=["openai"], route_class=OpenAIRoute)
# What the request guard refuses before routing (an upload past the limit, a stalled
# body) reaches OpenAI clients in OpenAI's shape too.
ERROR_SHAPES[PREFIX + "/"] = openai_error
# Uploads stream to Starlette's spool under PGBATCH_API_MAX_UPLOAD_BYTES.
MULTIPART_UPLOAD_PATHS.add(PREFIX + "/files")


class OpenAIErrorDetail(BaseModel):
    """OpenAI's error: what went wrong, its type, the parameter and a code."""

    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorOut(BaseModel):
    """OpenAI's error body."""

    error: OpenAIErrorDetail


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    described = {
        400: "A parameter is missing or invalid; `param` names it.",
        401: "Missing or invalid API token.",
        404: "No such file or batch (for this tenant).",
        409: "The batch cannot change from its state.",
        413: "The upload is larger than the server accepts.",
        429: "Too many uploads of this tenant at once.",
        503: "The database is busy or away; retry after Retry-After seconds.",
    }
    return {
        c: {"model": OpenAIErrorOut, "description": described[c]} for c in (400, 401, 503, *codes)
    }


class OpenAIFile(BaseModel):
    """OpenAI's file object."""

    id: str
    object: Literal["file"]
    bytes: int
    created_at: int | None
    filename: str
    purpose: str
    status: str
    status_details: str | None
    expires_at: int | None


class OpenAIFileList(BaseModel):
    """A page of files, newest first."""

    object: Literal["list"]
    data: list[OpenAIFile]
    first_id: str | None
    last_id: str | None
    has_more: bool


class OpenAIFileDeleted(BaseModel):
    """The answer to a file's deletion."""

    id: str
    object: Literal["file"]
    deleted: bool


class OpenAIBatchCreate(BaseModel):
    """A batch to run: the uploaded file of requests, their endpoint and the window."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=200)
    endpoint: str = Field(max_length=200)
    completion_window: str = Field(max_length=20)
    metadata: dict[str, str] | None = None
    # pgbatch's extensions (the openai client sends them as `extra_body`).
    cache: bool = Field(
        default=False, description="Reuse stored answers to identical requests; store these."
    )
    upstream: str | None = Field(
        default=None, max_length=200, description="A configured upstream's name."
    )


class OpenAIBatchError(BaseModel):
    """One reason a file failed validation: its line, code, message and parameter."""

    code: str
    line: int | None
    message: str
    param: str | None


class OpenAIBatchErrors(BaseModel):
    """Validation errors of a failed batch."""

    object: Literal["list"]
    data: list[OpenAIBatchError]


class OpenAIRequestCounts(BaseModel):
    """Requests in the batch, done with a 2xx answer, and failed."""

    total: int
    completed: int
    failed: int


class OpenAIInputTokensDetails(BaseModel):
    """Prompt tokens the upstream served from its prompt cache."""

    cached_tokens: int


class OpenAIOutputTokensDetails(BaseModel):
    """Completion tokens spent reasoning (not kept apart here: 0)."""

    reasoning_tokens: int


class OpenAIBatchUsage(BaseModel):
    """Tokens the batch's requests used so far, as OpenAI's batch object reports them."""

    input_tokens: int
    input_tokens_details: OpenAIInputTokensDetails
    output_tokens: int
    output_tokens_details: OpenAIOutputTokensDetails
    total_tokens: int


class OpenAIBatch(BaseModel):
    """OpenAI's batch object."""

    id: str
    object: Literal["batch"]
    endpoint: str
    errors: OpenAIBatchErrors | None
    input_file_id: str
    completion_window: str
    status: Literal[
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: OpenAIRequestCounts
    metadata: dict[str, str] | None
    usage: OpenAIBatchUsage | None = None


class OpenAIBatchList(BaseModel):
    """A page of batches, newest first."""

    object: Literal["list"]
    data: list[OpenAIBatch]
    first_id: str | None
    last_id: str | None
    has_more: bool


FileId = Annotated[str, Field(max_length=200)]


@router.post(
    "/files",
    response_model=OpenAIFile,
    responses=_errors(413, 429),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        # Titled, so the document names it (OpenAIFileUpload) for generators.
                        "title": "OpenAIFileUpload",
                        "type": "object",
                        "required": ["file", "purpose"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            "purpose": {"type": "string", "enum": list(service.FILE_PURPOSES)},
                        },
                    }
                }
            },
        }
    },
)
async def openai_upload_file(request: Request, tenant: Tenant) -> dict[str, Any]:
    """Upload a request file (multipart: `file`, `purpose=batch`), spooled, then stored."""
    state = api_state(request)
    async with state.uploads.slot(tenant):
        # Starlette's parser spools the file to disk past 1 MiB; the request guard bounds
        # the body (PGBATCH_API_MAX_UPLOAD_BYTES) and its read timeouts as it streams.
        async with request.form(max_files=1, max_fields=MAX_FORM_FIELDS) as form:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str):
                raise BatchApiError(
                    400, "missing_required_parameter", "purpose is required (batch)", "purpose"
                )
            if not isinstance(upload, UploadFile):
                raise BatchApiError(
                    400, "missing_required_parameter", "file is required (a file part)", "file"
                )
            size = upload.size if upload.size is not None else 0
            return await service.store_file(
                state.app,
                tenant,
                # PostgreSQL's text cannot hold NUL; a name is kept for display only.
                filename=(upload.filename or "file").replace("\x00", "")[:255] or "file",
                purpose=purpose,
                content=upload.file,
                size=size,
            )


@router.get("/files", response_model=OpenAIFileList, responses=_errors(404))
async def openai_list_files(
    request: Request,
    tenant: Tenant,
    after: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_FILE_PAGE)] = 100,
    purpose: Annotated[str | None, Query(max_length=100)] = None,
) -> dict[str, Any]:
    """List the tenant's uploaded files, newest first (`after`: the last id of a page)."""
    return await service.list_files(
        api_state(request).app, tenant, after=after, limit=limit, purpose=purpose
    )


@router.get("/files/{file_id}", response_model=OpenAIFile, responses=_errors(404))
async def openai_get_file(request: Request, tenant: Tenant, file_id: FileId) -> dict[str, Any]:
    """Return a file: an upload, or a finished batch's output or error file."""
    return await service.get_file(api_state(request).app, tenant, file_id)


@router.delete("/files/{file_id}", response_model=OpenAIFileDeleted, responses=_errors(404))
async def openai_delete_file(request: Request, tenant: Tenant, file_id: FileId) -> dict[str, Any]:
    """Delete an uploaded file; batches made from it keep running."""
    return await service.delete_file(api_state(request).app, tenant, file_id)


@router.get(
    "/files/{file_id}/content",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file's bytes."},
        **_errors(404),
    },
)
async def openai_file_content(
    request: Request, tenant: Tenant, file_id: FileId
) -> StreamingResponse:
    """Stream a file's content: as uploaded, or a batch's output or error lines (JSONL)."""
    chunks = await service.file_content(api_state(request).app, tenant, file_id)

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk

    return StreamingResponse(body(), media_type="application/octet-stream")


@router.post("/batches", response_model=OpenAIBatch, responses=_errors(404))
async def openai_create_batch(
    request: Request, tenant: Tenant, batch: OpenAIBatchCreate
) -> dict[str, Any]:
    """Validate a file of requests and run it: `failed` with line errors, or `in_progress`."""
    return await service.create_batch(
        api_state(request).app,
        tenant,
        input_file_id=batch.input_file_id,
        endpoint=batch.endpoint,
        completion_window=batch.completion_window,
        metadata=batch.metadata,
        cache=batch.cache,
        upstream=batch.upstream,
    )


@router.get("/batches", response_model=OpenAIBatchList, responses=_errors(404))
async def openai_list_batches(
    request: Request,
    tenant: Tenant,
    after: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_BATCH_PAGE)] = 20,
) -> dict[str, Any]:
    """List the tenant's batches, newest first (`after`: the last id of a page)."""
    return await service.list_batches(api_state(request).app, tenant, after=after, limit=limit)


@router.get("/batches/{batch_id}", response_model=OpenAIBatch, responses=_errors(404))
async def openai_get_batch(request: Request, tenant: Tenant, batch_id: FileId) -> dict[str, Any]:
    """Return a batch: its status, request counts, times and files."""
    return await service.get_batch(api_state(request).app, tenant, batch_id)


@router.post("/batches/{batch_id}/cancel", response_model=OpenAIBatch, responses=_errors(404, 409))
async def openai_cancel_batch(request: Request, tenant: Tenant, batch_id: FileId) -> dict[str, Any]:
    """Cancel a batch: `cancelling` until its running requests end, then `cancelled`."""
    return await service.cancel_batch(api_state(request).app, tenant, batch_id)


@router.api_route(
    "/{path:path}",
    methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)
async def unknown(path: str) -> Response:
    """Answer what the OpenAI API here does not have, in its error shape."""
    return openai_error(404, "unknown_url", f"Unknown request URL: {PREFIX}/{path[:200]}.")
