"""Vector libraries over HTTP: /v1/libraries, their documents, chunks and search.

Every resource has an ETag (its version); PATCH and DELETE need If-Match (428 without
it, 412 when it names an old version); a duplicate library name is 409, decided by the
unique constraint. Another tenant's library or document answers 404, as a missing one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Iterator
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from pgbatch.api.errors import ERRORS, ApiError
from pgbatch.api.guards import NDJSON, NDJSON_MEDIA_TYPES, NDJSON_UPLOAD_PATHS, OCTET_STREAM
from pgbatch.api.media import JSON_BODY
from pgbatch.api.routes.batches import SpooledFile, spool_upload
from pgbatch.api.schemas import ErrorOut, IfMatchHeader, IntegerText
from pgbatch.api.state import Tenant, api_state
from pgbatch.errors import InvalidBatchError
from pgbatch.workloads.vectors import libraries as lib
from pgbatch.workloads.vectors.embedders import DEFAULT_EMBEDDER
from pgbatch.workloads.vectors.limits import SearchBusyError, SearchTimeoutError
from pgbatch.workloads.vectors.queries import ChunkRow, DocumentRecord, LibraryRecord

__all__ = ["router"]

router = APIRouter(prefix="/v1/libraries", tags=["libraries"])

T = TypeVar("T")
MAX_ID = 2**63 - 1
LibraryId = Annotated[int, Path(ge=1, le=MAX_ID), IntegerText]
DocumentId = Annotated[int, Path(ge=1, le=MAX_ID), IntegerText]
Cursor = Annotated[
    str | None, Query(description="`next_cursor` of the previous page.", max_length=20)
]
Limit = Annotated[int, Query(ge=1, le=500), IntegerText]
Metadata = Annotated[
    dict[str, Any], Field(description="A JSON object; search filters match it with @>.")
]
ChunkText = Annotated[
    str, Field(min_length=1, max_length=lib.MAX_TEXT_CHARS, pattern=r"^[^\x00]*$")
]
DocumentStatus = Literal["pending", "indexing", "indexed", "failed", "cancelled"]
# The import streams its NDJSON body under the upload limit, as POST /v1/batches does.
IMPORT_PATH = re.compile(r"/v1/libraries/[^/]+/documents/import")
NDJSON_UPLOAD_PATHS.append(IMPORT_PATH)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LibraryCreate(_Strict):
    """A new library: its name (unique for the tenant), metadata, embedder and dimension."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$")
    metadata: Metadata = Field(default_factory=dict)
    embedder: str = Field(default=DEFAULT_EMBEDDER, min_length=1, max_length=200)
    dimension: int | None = Field(default=None, ge=1, le=2000)


class LibraryPatch(_Strict):
    """Change the name and/or the metadata (embedder and dimension are fixed)."""

    name: str | None = Field(
        default=None, min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]*$"
    )
    metadata: Metadata | None = None


class LibraryOut(BaseModel):
    """A library; its ETag is `version`."""

    id: int
    name: str
    metadata: dict[str, Any]
    embedder: str
    dimension: int
    version: int
    created_at: datetime
    updated_at: datetime
    documents: dict[str, int] | None = Field(
        default=None, description="Documents by status (in GET of one library)."
    )


class LibraryList(BaseModel):
    """One page of libraries by id; pass `next_cursor` as `cursor` for the next."""

    libraries: list[LibraryOut]
    next_cursor: str | None


class LibraryDocumentCreate(_Strict):
    """A document: its text (chunked by the server) or its chunks, and its metadata."""

    text: ChunkText | None = None
    chunks: list[ChunkText] | None = Field(default=None, min_length=1, max_length=10_000)
    metadata: Metadata = Field(default_factory=dict)


class LibraryDocumentsCreate(_Strict):
    """Up to 1,000 documents, indexed by one batch."""

    documents: list[LibraryDocumentCreate] = Field(min_length=1, max_length=1_000)


class LibraryImportOut(BaseModel):
    """An NDJSON import: how many documents it added, and the one batch that indexes them."""

    documents: int
    batch_id: int | None


class LibraryDocumentPatch(_Strict):
    """Replace the document's metadata."""

    metadata: Metadata


class LibraryReindex(_Strict):
    """Index the document again, with new text or chunks when given."""

    text: ChunkText | None = None
    chunks: list[ChunkText] | None = Field(default=None, min_length=1, max_length=10_000)


class LibraryDocumentOut(BaseModel):
    """A document's state; its ETag is `version`; `batch_id` is its latest indexing batch."""

    id: int
    library_id: int
    metadata: dict[str, Any]
    status: DocumentStatus
    error: str | None
    version: int
    content_version: int
    indexed_version: int | None
    chunk_count: int
    batch_id: int | None
    created_at: datetime
    updated_at: datetime


class LibraryDocumentList(BaseModel):
    """One page of documents by id."""

    documents: list[LibraryDocumentOut]
    next_cursor: str | None


class LibraryDocumentsOut(BaseModel):
    """Documents added or re-indexed, and the batch that indexes them."""

    documents: list[LibraryDocumentOut]
    batch_id: int | None


class LibraryChunkOut(BaseModel):
    """One chunk of a document."""

    seq: int
    content_version: int
    text: str


class LibraryChunkList(BaseModel):
    """One page of a document's chunks, in order."""

    chunks: list[LibraryChunkOut]
    next_cursor: str | None


class LibrarySearch(_Strict):
    """Search by text (embedded as the library's documents) or by a vector."""

    text: Annotated[str, Field(min_length=1, max_length=100_000, pattern=r"^[^\x00]*$")] | None = (
        None
    )
    vector: list[StrictFloat | StrictInt] | None = Field(
        default=None, min_length=1, max_length=2000
    )
    k: int = Field(default=10, ge=1, le=lib.MAX_K)
    filter: dict[str, Any] | None = Field(
        default=None, description="Keep chunks whose document's metadata contains this."
    )
    exact: bool = Field(default=False, description="Compare every chunk instead of HNSW.")


class LibrarySearchHit(BaseModel):
    """A hit: the chunk, its document, and its score (1 - cosine distance)."""

    document_id: int
    seq: int
    content_version: int
    text: str
    metadata: dict[str, Any]
    score: float


class LibrarySearchResults(BaseModel):
    """The hits, best first."""

    hits: list[LibrarySearchHit]


def _etag(version: int) -> str:
    return f'"{version}"'


def _expected_version(if_match: str | None) -> int:
    if if_match is None:
        raise ApiError(
            428,
            "precondition_required",
            "send If-Match with the ETag from GET (the resource's version)",
            field="If-Match",
        )
    tag = if_match.strip().removeprefix("W/").strip('"')
    if not (tag.isascii() and tag.isdigit() and len(tag) <= 18):
        raise ApiError(
            412, "stale_version", f"If-Match {if_match!r} is not an ETag", field="If-Match"
        )
    return int(tag)


def _after(cursor: str | None, first: int = 0) -> int:
    if cursor is None:
        return first
    if not (cursor.isascii() and cursor.lstrip("-").isdigit() and len(cursor) <= 18):
        raise ApiError(422, "invalid_request", "cursor: not a cursor from this API", field="cursor")
    return int(cursor)


async def _call(work: Awaitable[T]) -> T:
    """Await `work`, answering the workload's errors in the API's shape."""
    try:
        return await work
    except lib.LibraryNotFoundError as exc:
        raise ApiError(404, "library_not_found", str(exc)) from None
    except lib.DocumentNotFoundError as exc:
        raise ApiError(404, "document_not_found", str(exc)) from None
    except lib.LibraryExistsError as exc:
        raise ApiError(409, "library_exists", str(exc), field="name") from None
    except lib.VersionMismatchError as exc:
        raise ApiError(
            412,
            "stale_version",
            f"{exc}; read it again and retry with its ETag",
            field="If-Match",
            headers={"ETag": _etag(exc.current_version)},
        ) from None
    except SearchBusyError as exc:
        raise ApiError(
            429,
            "too_many_searches",
            str(exc),
            field="exact",
            headers={"Retry-After": str(exc.retry_after_s)},
        ) from None
    except SearchTimeoutError as exc:
        # 503 with Retry-After, as for a statement the server cancelled elsewhere in the
        # API (database_busy), under a code of its own: narrowing the search may help.
        raise ApiError(503, "search_timeout", str(exc), headers={"Retry-After": "1"}) from None
    except lib.ImportTooLargeError as exc:
        # As POST /v1/batches answers a body of too many items.
        raise ApiError(413, "too_many_items", str(exc), field="body") from None
    except lib.EmbedderUnavailableError as exc:
        # The embedder's upstream is out of rate budget or failing: the server's side, so
        # a 503 (not a 422 naming `text`), retried after the time the limit still holds.
        retry_after = str(max(1, math.ceil(exc.retry_after_s)))
        raise ApiError(
            503, "embedder_unavailable", str(exc), headers={"Retry-After": retry_after}
        ) from None
    except lib.ExtensionMissingError as exc:
        # A 4xx, not a 503: a server without the extension will not grow one if the
        # client retries, and the request cannot succeed on it as it is.
        raise ApiError(409, "pgvector_missing", str(exc)) from None
    except InvalidBatchError as exc:
        raise ApiError(422, "invalid_request", str(exc), field=exc.field) from None


async def _checked(document: lib.DocumentIn) -> lib.DocumentIn:
    return lib.check_document(document)


def _library_out(library: LibraryRecord, counts: dict[str, int] | None = None) -> LibraryOut:
    return LibraryOut(
        id=library.id,
        name=library.name,
        metadata=library.metadata,
        embedder=library.embedder,
        dimension=library.dimension,
        version=library.version,
        created_at=library.created_at,
        updated_at=library.updated_at,
        documents=counts,
    )


def _document_out(document: DocumentRecord) -> LibraryDocumentOut:
    return LibraryDocumentOut.model_validate(document, from_attributes=True)


def _chunk_out(chunk: ChunkRow) -> LibraryChunkOut:
    return LibraryChunkOut(seq=chunk.seq, content_version=chunk.content_version, text=chunk.text)


@router.post(
    "",
    status_code=201,
    response_model=LibraryOut,
    responses=ERRORS(409, 415),
    dependencies=[JSON_BODY],
)
async def create_library(
    request: Request, response: Response, tenant: Tenant, body: LibraryCreate
) -> LibraryOut:
    """Create a library; 409 if the tenant has one of that name, or the server no pgvector."""
    library = await _call(
        lib.create_library(
            api_state(request).app,
            tenant=tenant,
            name=body.name,
            metadata=body.metadata,
            embedder=body.embedder,
            dimension=body.dimension,
        )
    )
    response.headers["ETag"] = _etag(library.version)
    response.headers["Location"] = f"/v1/libraries/{library.id}"
    return _library_out(library)


@router.get("", response_model=LibraryList, responses=ERRORS())
async def list_libraries(
    request: Request, tenant: Tenant, cursor: Cursor = None, limit: Limit = 50
) -> LibraryList:
    """List the tenant's libraries by id, a page at a time."""
    found = await _call(
        lib.list_libraries(api_state(request).app, tenant=tenant, after=_after(cursor), limit=limit)
    )
    next_cursor = str(found[-1].id) if len(found) == limit else None
    return LibraryList(libraries=[_library_out(x) for x in found], next_cursor=next_cursor)


@router.get("/{library_id}", response_model=LibraryOut, responses=ERRORS(404))
async def get_library(
    request: Request, response: Response, tenant: Tenant, library_id: LibraryId
) -> LibraryOut:
    """Read a library, with its documents counted by status."""
    app = api_state(request).app
    library = await _call(lib.get_library(app, library_id, tenant=tenant))
    counts = await _call(lib.status_counts(app, library_id, tenant=tenant))
    response.headers["ETag"] = _etag(library.version)
    return _library_out(library, counts)


@router.patch(
    "/{library_id}",
    response_model=LibraryOut,
    responses=ERRORS(404, 409, 412, 415, 428),
    dependencies=[JSON_BODY],
)
async def patch_library(
    request: Request,
    response: Response,
    tenant: Tenant,
    library_id: LibraryId,
    body: LibraryPatch,
    if_match: IfMatchHeader = None,
) -> LibraryOut:
    """Rename the library or replace its metadata; needs If-Match."""
    version = _expected_version(if_match)
    library = await _call(
        lib.update_library(
            api_state(request).app,
            library_id,
            tenant=tenant,
            version=version,
            name=body.name,
            metadata=body.metadata,
        )
    )
    response.headers["ETag"] = _etag(library.version)
    return _library_out(library)


@router.delete(
    "/{library_id}", status_code=204, response_class=Response, responses=ERRORS(404, 412, 428)
)
async def delete_library(
    request: Request, tenant: Tenant, library_id: LibraryId, if_match: IfMatchHeader = None
) -> Response:
    """Delete the library with its documents and chunks; needs If-Match."""
    version = _expected_version(if_match)
    await _call(
        lib.delete_library(api_state(request).app, library_id, tenant=tenant, version=version)
    )
    return Response(status_code=204)


@router.post(
    "/{library_id}/documents",
    status_code=201,
    response_model=LibraryDocumentOut,
    responses=ERRORS(404, 415),
    dependencies=[JSON_BODY],
)
async def add_document(
    request: Request,
    response: Response,
    tenant: Tenant,
    library_id: LibraryId,
    body: LibraryDocumentCreate,
) -> LibraryDocumentOut:
    """Add one document (pending) and submit the batch that indexes it."""
    document = lib.DocumentIn(text=body.text, chunks=body.chunks, metadata=body.metadata)
    # Checked here first so that an error names this body's fields, not `documents.0.…`.
    await _call(_checked(document))
    added, _ = await _call(
        lib.add_documents(api_state(request).app, library_id, [document], tenant=tenant)
    )
    response.headers["ETag"] = _etag(added[0].version)
    response.headers["Location"] = f"/v1/libraries/{library_id}/documents/{added[0].id}"
    return _document_out(added[0])


@router.post(
    "/{library_id}/documents/bulk",
    status_code=201,
    response_model=LibraryDocumentsOut,
    responses=ERRORS(404, 415),
    dependencies=[JSON_BODY],
)
async def add_documents(
    request: Request, tenant: Tenant, library_id: LibraryId, body: LibraryDocumentsCreate
) -> LibraryDocumentsOut:
    """Add up to 1,000 documents, indexed by one batch."""
    documents = [
        lib.DocumentIn(text=d.text, chunks=d.chunks, metadata=d.metadata) for d in body.documents
    ]
    added, batch = await _call(
        lib.add_documents(api_state(request).app, library_id, documents, tenant=tenant)
    )
    return LibraryDocumentsOut(
        documents=[_document_out(d) for d in added], batch_id=None if batch is None else batch.id
    )


@router.post(
    "/{library_id}/documents/import",
    status_code=201,
    response_model=LibraryImportOut,
    responses=ERRORS(404, 413, 415),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                # Described under application/octet-stream, as POST /v1/batches' NDJSON.
                OCTET_STREAM: {
                    "schema": {"type": "string", "format": "binary"},
                    "description": 'NDJSON: one document per line, {"text": ...} or '
                    '{"chunks": [...]}, with an optional "metadata" object. Send it as '
                    f"{NDJSON} or {OCTET_STREAM}.",
                },
            },
        }
    },
)
async def import_documents(
    request: Request, tenant: Tenant, library_id: LibraryId
) -> LibraryImportOut:
    """Import NDJSON documents as one indexing batch: all of them, or none (422 naming the
    first bad line)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in NDJSON_MEDIA_TYPES:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type must be {NDJSON} (or {OCTET_STREAM}), not {content_type!r}",
            field="Content-Type",
        )
    state = api_state(request)
    async with state.uploads.slot(tenant):
        with await _spool_import(request, state.settings.api_max_item_bytes) as spool:

            def lines() -> Iterator[bytes]:
                yield from spool

            # As for batches: a pooled connection is taken only with the whole body here.
            count, batch = await _call(
                lib.import_documents(
                    state.app,
                    library_id,
                    lines(),
                    tenant=tenant,
                    max_documents=state.settings.api_max_items,
                )
            )
    return LibraryImportOut(documents=count, batch_id=None if batch is None else batch.id)


async def _spool_import(request: Request, max_line: int) -> SpooledFile:
    """Spool the import's body as POST /v1/batches does; a long line names this `body`."""
    try:
        return await spool_upload(request, max_line)
    except ApiError as exc:
        if exc.code != "item_too_large":
            raise
        line = exc.message.split(":", 1)[0]
        raise ApiError(
            413,
            "item_too_large",
            f"{line}: a document's line may be at most {max_line} bytes "
            "(PGBATCH_API_MAX_ITEM_BYTES)",
            field="body",
        ) from None


@router.get("/{library_id}/documents", response_model=LibraryDocumentList, responses=ERRORS(404))
async def list_documents(
    request: Request,
    tenant: Tenant,
    library_id: LibraryId,
    status: DocumentStatus | None = None,
    cursor: Cursor = None,
    limit: Limit = 50,
) -> LibraryDocumentList:
    """List the library's documents by id (of one status, when given)."""
    found = await _call(
        lib.list_documents(
            api_state(request).app,
            library_id,
            tenant=tenant,
            after=_after(cursor),
            limit=limit,
            status=status,
        )
    )
    next_cursor = str(found[-1].id) if len(found) == limit else None
    return LibraryDocumentList(documents=[_document_out(d) for d in found], next_cursor=next_cursor)


@router.get(
    "/{library_id}/documents/{document_id}",
    response_model=LibraryDocumentOut,
    responses=ERRORS(404),
)
async def get_document(
    request: Request,
    response: Response,
    tenant: Tenant,
    library_id: LibraryId,
    document_id: DocumentId,
) -> LibraryDocumentOut:
    """Read a document's state."""
    document = await _call(
        lib.get_document(api_state(request).app, library_id, document_id, tenant=tenant)
    )
    response.headers["ETag"] = _etag(document.version)
    return _document_out(document)


@router.patch(
    "/{library_id}/documents/{document_id}",
    response_model=LibraryDocumentOut,
    responses=ERRORS(404, 412, 415, 428),
    dependencies=[JSON_BODY],
)
async def patch_document(
    request: Request,
    response: Response,
    tenant: Tenant,
    library_id: LibraryId,
    document_id: DocumentId,
    body: LibraryDocumentPatch,
    if_match: IfMatchHeader = None,
) -> LibraryDocumentOut:
    """Replace a document's metadata; needs If-Match."""
    version = _expected_version(if_match)
    document = await _call(
        lib.update_document(
            api_state(request).app,
            library_id,
            document_id,
            tenant=tenant,
            version=version,
            metadata=body.metadata,
        )
    )
    response.headers["ETag"] = _etag(document.version)
    return _document_out(document)


@router.delete(
    "/{library_id}/documents/{document_id}",
    status_code=204,
    response_class=Response,
    responses=ERRORS(404, 412, 428),
)
async def delete_document(
    request: Request,
    tenant: Tenant,
    library_id: LibraryId,
    document_id: DocumentId,
    if_match: IfMatchHeader = None,
) -> Response:
    """Delete a document and its chunks; needs If-Match."""
    version = _expected_version(if_match)
    await _call(
        lib.delete_document(
            api_state(request).app, library_id, document_id, tenant=tenant, version=version
        )
    )
    return Response(status_code=204)


@router.post(
    "/{library_id}/documents/{document_id}/reindex",
    status_code=202,
    response_model=LibraryDocumentsOut,
    responses=ERRORS(404, 412, 415),
    dependencies=[JSON_BODY],
)
async def reindex_document(
    request: Request,
    tenant: Tenant,
    library_id: LibraryId,
    document_id: DocumentId,
    body: LibraryReindex,
    if_match: IfMatchHeader = None,
) -> LibraryDocumentsOut:
    """Index a document again (new text or chunks when given); If-Match optional (or `*`)."""
    # `*` matches any current version (RFC 9110): the same as no If-Match here.
    any_version = if_match is None or if_match.strip() == "*"
    version = None if any_version else _expected_version(if_match)
    content = None
    if body.text is not None or body.chunks is not None:
        content = lib.DocumentIn(text=body.text, chunks=body.chunks)
    changed, batch = await _call(
        lib.reindex_documents(
            api_state(request).app,
            library_id,
            [document_id],
            tenant=tenant,
            version=version,
            content=content,
        )
    )
    return LibraryDocumentsOut(
        documents=[_document_out(d) for d in changed], batch_id=None if batch is None else batch.id
    )


@router.get(
    "/{library_id}/documents/{document_id}/chunks",
    response_model=LibraryChunkList,
    responses=ERRORS(404),
)
async def list_chunks(
    request: Request,
    tenant: Tenant,
    library_id: LibraryId,
    document_id: DocumentId,
    cursor: Cursor = None,
    limit: Limit = 100,
) -> LibraryChunkList:
    """List a document's chunks in order."""
    found = await _call(
        lib.list_chunks(
            api_state(request).app,
            library_id,
            document_id,
            tenant=tenant,
            after=_after(cursor, -1),
            limit=limit,
        )
    )
    next_cursor = str(found[-1].seq) if len(found) == limit else None
    return LibraryChunkList(chunks=[_chunk_out(c) for c in found], next_cursor=next_cursor)


_SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {
        "model": ErrorOut,
        "description": "Too many exact searches at once (of this tenant, or in all); "
        "retry after Retry-After seconds.",
    },
    503: {
        "model": ErrorOut,
        "description": "The search ran past the statement timeout (`search_timeout`), "
        "the embedder of a text query is out of rate budget or its upstream is failing "
        "(`embedder_unavailable`), or the database is busy; retry after Retry-After "
        "seconds.",
    },
}


@router.post(
    "/{library_id}/search",
    response_model=LibrarySearchResults,
    responses=ERRORS(404, 415, extra=_SEARCH_ERRORS),
    dependencies=[JSON_BODY],
)
async def search_library(
    request: Request, tenant: Tenant, library_id: LibraryId, body: LibrarySearch
) -> LibrarySearchResults:
    """Return the k chunks nearest to the text or vector, filtered by document metadata."""
    hits = await _call(
        lib.search(
            api_state(request).app,
            library_id,
            tenant=tenant,
            text=body.text,
            vector=body.vector,
            k=body.k,
            metadata_filter=body.filter,
            exact=body.exact,
        )
    )
    return LibrarySearchResults(
        hits=[
            LibrarySearchHit(
                document_id=h.document_id,
                seq=h.seq,
                content_version=h.content_version,
                text=h.text,
                metadata=h.metadata,
                score=h.score,
            )
            for h in hits
        ]
    )
