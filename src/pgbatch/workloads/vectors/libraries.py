"""Vector libraries: what the API and the CLI call, and the indexing task.

A library (name unique per tenant) fixes its embedder and dimension at creation; its
documents are text (chunked here) or pre-cut chunks; chunks are embedded by an indexing
batch and searched with pgvector. Every change a client makes is one transaction through
`Database.run_in_transaction`, which retries deadlocks and serialization failures with
jittered backoff (invariant 6); every update and delete names the version it read.

**Indexing is a pgbatch batch** of task `TASK`: one item per document, `{library_id,
document_id, content_version}`. The handler reads the documents still at those content
versions, marks them `indexing`, chunks and embeds them, and queues one statement
(`pgbatch.vector_index_commit`) that runs in the shard's fenced completion transaction:
it replaces each document's chunks and marks it `indexed` only if its content_version is
still the one indexed. So a worker that lost its lease writes nothing; a re-index asked
while a worker indexes bumps the content version, the old shard's commit then writes
nothing, and the new batch's writes the last request's chunks; the replacement of a
document's chunks is one transaction, so a search sees the old ones or the new ones.

A document and the batch that indexes it commit in one transaction (`App.submit_in`),
which records the batch as the document's `batch_id`. When the batch ends, its completion
callback settles what it did not index (`settle_batch`: `failed` or `cancelled`, with
the reason); retention's hook does the same for a pruned batch (`settle_pruned`). An
NDJSON import is one such batch, streamed and all or nothing (`import_documents`).
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg

from pgbatch import json_values
from pgbatch.app import App
from pgbatch.engine.context import CallbackContext, ShardContext
from pgbatch.errors import InvalidBatchError, PgbatchError
from pgbatch.models import Batch, Item, Outcome, error, ok
from pgbatch.workloads.vectors import queries
from pgbatch.workloads.vectors.embedders import (
    DEFAULT_EMBEDDER,
    EmbedderError,
    EmbedderRegistry,
    default_registry,
)
from pgbatch.workloads.vectors.limits import SearchTimeoutError, search_limits
from pgbatch.workloads.vectors.queries import (
    ChunkRow,
    DocumentRecord,
    LibraryRecord,
    SearchRow,
)

__all__ = [
    "CHUNK_CHARS",
    "SETTLE_CALLBACK",
    "TASK",
    "DocumentIn",
    "DocumentNotFoundError",
    "EmbedderUnavailableError",
    "ExtensionMissingError",
    "ImportLineError",
    "ImportTooLargeError",
    "LibraryExistsError",
    "LibraryNotFoundError",
    "SearchHit",
    "VersionMismatchError",
    "add_documents",
    "check_document",
    "chunk_text",
    "create_library",
    "delete_document",
    "delete_library",
    "embedders",
    "get_document",
    "get_library",
    "import_documents",
    "index_shard",
    "list_chunks",
    "list_documents",
    "list_libraries",
    "register_tasks",
    "reindex_documents",
    "search",
    "settle_batch",
    "settle_pruned",
    "update_document",
    "update_library",
]

TASK = "pgbatch.vector_index"
# The completion callback of every indexing batch: it settles the documents the batch
# did not index (see settle_batch).
SETTLE_CALLBACK = "pgbatch.vector_index_settle"
# Documents settled per transaction when a batch ends or is pruned: a short lock on each
# chunk of rows, so a batch of 100,000 failed documents never holds one long transaction.
SETTLE_CHUNK_ROWS = 5_000
# Documents per indexing shard: a shard's embedding call and its commit stay short
# against the lease (32 documents of a few chunks is a few hundred vectors, ~1 MB of
# vector text), and a crash re-indexes at most this many documents.
DOCUMENTS_PER_SHARD = 32
# A chunk is at most this many characters, cut at whitespace: about 200 tokens, inside
# the 256-token window of the small sentence models and far inside OpenAI's 8k.
CHUNK_CHARS = 1_000
MAX_CHUNKS_PER_DOCUMENT = 10_000
# A document's text, and each of its chunks, in characters: the HTTP models' bound, held
# here too so that an import (or the CLI) takes no document POST would refuse.
MAX_TEXT_CHARS = 100_000
MAX_K = 1_000
# HNSW's candidate list at search (pgvector's default is 40). At 100,000 chunks of 384
# (docs/vectors.md) with the index of queries.HNSW_EF_CONSTRUCTION, 100 already gave
# recall@10 0.998-1.000; 200 keeps the margin for libraries whose index was built at
# ef_construction 64 (0.945-0.965 at 200 there) for a few ms more per search.
DEFAULT_EF_SEARCH = 200
# A filtered HNSW scan visits at most this many chunks (pgvector's default) before it
# gives up; fewer than k hits then, and the search falls back to an exact one.
MAX_SCAN_TUPLES = 20_000

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,199}$")
_REGISTRIES: weakref.WeakKeyDictionary[App, EmbedderRegistry] = weakref.WeakKeyDictionary()


class LibraryNotFoundError(InvalidBatchError, LookupError):
    """The tenant has no such library (another tenant's reads the same)."""


class DocumentNotFoundError(InvalidBatchError, LookupError):
    """The library has no such document (for this tenant)."""


class LibraryExistsError(InvalidBatchError):
    """The tenant already has a library of that name (the unique constraint said so)."""


class VersionMismatchError(InvalidBatchError):
    """The resource changed since the caller read it: `current_version` is its version now."""

    def __init__(self, message: str, *, current_version: int) -> None:
        super().__init__(message, field="If-Match")
        self.current_version = current_version


class ExtensionMissingError(InvalidBatchError):
    """The PostgreSQL server has no pgvector: libraries cannot be created on it."""


class EmbedderUnavailableError(PgbatchError):
    """The embedder could not embed a query for now (its rate budget or upstream is out).

    The server's side, not the request's: a later attempt may succeed, after
    `retry_after_s` seconds. A PgbatchError, so the CLI prints it without a traceback.
    """

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ImportLineError(InvalidBatchError):
    """A line of an NDJSON import is not a document: `line` says which (1-based)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}", field="body")
        self.line = line
        self.reason = message


class ImportTooLargeError(ImportLineError):
    """An NDJSON import holds more documents than allowed: `line` is the first past it."""


@dataclass(frozen=True, slots=True)
class DocumentIn:
    """A document to add: its text or its pre-cut chunks, and its metadata."""

    text: str | None = None
    chunks: list[str] | None = None
    metadata: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class SearchHit:
    """A search result: the chunk, its document, and its score (1 - cosine distance)."""

    document_id: int
    seq: int
    content_version: int
    text: str
    metadata: dict[str, Any]
    score: float


def embedders(app: App) -> EmbedderRegistry:
    """Return the app's embedder registry (register OpenAI or local models on it)."""
    registry = _REGISTRIES.get(app)
    if registry is None:
        registry = _REGISTRIES[app] = default_registry()
    return registry


def register_tasks(app: App) -> None:
    """Register the indexing task on `app` (what `app.use(vectors.WORKLOAD)` runs)."""
    # Read the search limits now: a bad PGBATCH_VECTORS_* fails at start-up, not a request.
    search_limits(app)
    if TASK in app.tasks:
        return

    async def handler(items: list[Item], ctx: ShardContext) -> list[Outcome]:
        return await index_shard(app, items, ctx)

    app.task(TASK, shard_size=DOCUMENTS_PER_SHARD, internal=True)(handler)

    async def settle(batch: Batch, ctx: CallbackContext) -> None:
        await settle_batch(app, batch)

    app.callback(SETTLE_CALLBACK)(settle)


def chunk_text(text: str, *, max_chars: int = CHUNK_CHARS) -> list[str]:
    """Cut `text` into chunks of at most `max_chars`, at whitespace where it can."""
    words = text.split()
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for word in words:
        while len(word) > max_chars:  # a "word" longer than a chunk is cut hard
            if current:
                chunks.append(" ".join(current))
                current, size = [], 0
            chunks.append(word[:max_chars])
            word = word[max_chars:]
        if size + len(word) + (1 if current else 0) > max_chars:
            chunks.append(" ".join(current))
            current, size = [], 0
        size += len(word) + (1 if current else 0)
        current.append(word)
    if current:
        chunks.append(" ".join(current))
    return chunks


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidBatchError(
            "name must be 1-200 letters, digits, '.', '_', '-' or spaces, not starting "
            "with a symbol",
            field="name",
        )
    return name


def check_document(document: DocumentIn, field: str = "", *, nul_free: bool = False) -> DocumentIn:
    """Return `document` if it may be stored; raise InvalidBatchError naming the field.

    `field` prefixes the names (`documents.3`): "" names a request body's own fields.
    """

    def sub(name: str) -> str:
        return f"{field}.{name}" if field else name

    if (document.text is None) == (document.chunks is None):
        raise InvalidBatchError("give either text or chunks", field=field or "text")
    if document.chunks is not None:
        if not 0 < len(document.chunks) <= MAX_CHUNKS_PER_DOCUMENT:
            raise InvalidBatchError(
                f"chunks must hold 1 to {MAX_CHUNKS_PER_DOCUMENT} strings", field=sub("chunks")
            )
        for n, chunk in enumerate(document.chunks):
            if not isinstance(chunk, str) or not chunk.strip():
                raise InvalidBatchError("a chunk must be non-empty text", field=sub(f"chunks.{n}"))
            if len(chunk) > MAX_TEXT_CHARS:
                raise InvalidBatchError(
                    f"a chunk may hold at most {MAX_TEXT_CHARS} characters",
                    field=sub(f"chunks.{n}"),
                )
    elif not document.text or not document.text.strip():
        raise InvalidBatchError("text must not be empty", field=sub("text"))
    elif len(document.text) > MAX_TEXT_CHARS:
        raise InvalidBatchError(
            f"text may hold at most {MAX_TEXT_CHARS} characters", field=sub("text")
        )
    _check_json(document.metadata or {}, sub("metadata"), nul_free=nul_free)
    for value in (document.text, *(document.chunks or ())):
        if value is not None and "\x00" in value:
            raise InvalidBatchError("text cannot hold NUL characters", field=field or "text")
    return document


def _check_json(value: Any, field: str, *, nul_free: bool = False) -> None:
    """Refuse what jsonb cannot store or read back exactly (NUL, huge or non-finite numbers).

    `nul_free`: the caller knows no string holds a NUL (parsed JSON without `\\u0000`).
    """
    try:
        json_values.check_value(value)
    except json_values.JsonValueError as exc:
        raise InvalidBatchError(f"{field}: {exc}", field=field) from None
    if nul_free:
        return
    stack: list[Any] = [value]
    while stack:
        current = stack.pop()
        if isinstance(current, str) and "\x00" in current:
            raise InvalidBatchError(f"{field}: JSON text cannot hold NUL here", field=field)
        if isinstance(current, dict):
            stack.extend(current.keys())
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)


def _vector_text(vector: Sequence[float]) -> str:
    # pgvector's text form; repr keeps every float's digits.
    return "[" + ",".join(repr(float(x)) for x in vector) + "]"


async def create_library(
    app: App,
    *,
    tenant: str,
    name: str,
    metadata: dict[str, Any] | None = None,
    embedder: str = DEFAULT_EMBEDDER,
    dimension: int | None = None,
) -> LibraryRecord:
    """Create a library and its chunk table; raise LibraryExistsError for a taken name.

    Raise ExtensionMissingError when the server has no pgvector, InvalidBatchError
    naming the field for a bad name, embedder or dimension. Nothing is written then.
    """
    _check_name(name)
    _check_json(metadata or {}, "metadata")
    try:
        made = embedders(app).get(embedder)
    except EmbedderError as exc:
        raise InvalidBatchError(str(exc), field="embedder") from None
    if dimension is None:
        dimension = made.dimension
    if dimension != made.dimension:
        raise InvalidBatchError(
            f"embedder {embedder!r} makes vectors of {made.dimension}, not {dimension}",
            field="dimension",
        )
    await app.open()

    async def work(conn: psycopg.AsyncConnection[Any]) -> LibraryRecord:
        installed, available = await queries.extension_state(conn)
        if not installed:
            if not available:
                raise ExtensionMissingError(
                    "this PostgreSQL server has no pgvector extension ('vector'): install "
                    "it (https://github.com/pgvector/pgvector) or use the embedded server",
                    field="embedder",
                )
            await queries.create_extension(conn)
        library = await queries.insert_library(
            conn,
            tenant=tenant,
            name=name,
            metadata=metadata or {},
            embedder=embedder,
            dimension=dimension,
        )
        if library is None:
            raise LibraryExistsError(f"a library named {name!r} exists already", field="name")
        await queries.create_chunks_table(conn, library.id, library.dimension)
        return library

    return await app.db.run_in_transaction(work)


async def get_library(app: App, library_id: int, *, tenant: str) -> LibraryRecord:
    """Return `tenant`'s library; raise LibraryNotFoundError."""
    await app.open()
    async with app.db.connection() as conn:
        library = await queries.get_library(conn, tenant, library_id)
    if library is None:
        raise LibraryNotFoundError(f"no library {library_id}", field="library_id")
    return library


async def list_libraries(
    app: App, *, tenant: str, after: int = 0, limit: int = 100
) -> list[LibraryRecord]:
    """Return a page of `tenant`'s libraries in id order, after the id `after`."""
    await app.open()
    async with app.db.connection() as conn:
        return await queries.list_libraries(conn, tenant, after=after, limit=limit)


async def _stale_or_missing(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int
) -> Exception:
    current = await queries.get_library(conn, tenant, library_id)
    if current is None:
        return LibraryNotFoundError(f"no library {library_id}", field="library_id")
    return VersionMismatchError(
        f"library {library_id} is at version {current.version}", current_version=current.version
    )


async def update_library(
    app: App,
    library_id: int,
    *,
    tenant: str,
    version: int,
    name: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> LibraryRecord:
    """Change the name and/or metadata of the library at `version`.

    Raise VersionMismatchError if it moved on, LibraryExistsError for a taken name.
    """
    if name is not None:
        _check_name(name)
    if metadata is not None:
        _check_json(metadata, "metadata")
    await app.open()

    async def work(conn: psycopg.AsyncConnection[Any]) -> LibraryRecord:
        try:
            async with conn.transaction():
                updated = await queries.update_library(
                    conn, tenant, library_id, version=version, name=name, metadata=metadata
                )
        except psycopg.errors.UniqueViolation:
            raise LibraryExistsError(
                f"a library named {name!r} exists already", field="name"
            ) from None
        if updated is None:
            raise await _stale_or_missing(conn, tenant, library_id)
        return updated

    return await app.db.run_in_transaction(work)


async def delete_library(app: App, library_id: int, *, tenant: str, version: int) -> None:
    """Delete the library at `version`: its chunk table, documents and chunks, at once.

    The library row is locked first, as an indexing commit locks it (FOR SHARE) before
    writing: a commit in flight finishes before the delete, and one after it writes nothing.
    """
    await app.open()

    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        current = await queries.lock_library(conn, tenant, library_id)
        if current is None:
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id")
        if current != version:
            raise VersionMismatchError(
                f"library {library_id} is at version {current}", current_version=current
            )
        await queries.drop_chunks_table(conn, library_id)
        await queries.delete_library(conn, tenant, library_id, version=version)

    await app.db.run_in_transaction(work)


async def _submit_indexing(
    app: App,
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    library_id: int,
    documents: Sequence[DocumentRecord],
) -> Batch | None:
    """Submit the batch that indexes `documents`, in the caller's transaction, and make it
    their batch: the documents' new versions, the batch and its ownership commit together."""
    if not documents:
        return None
    batch = await app.submit_in(
        conn,
        TASK,
        [
            {"library_id": library_id, "document_id": d.id, "content_version": d.content_version}
            for d in documents
        ],
        tenant=tenant,
        on_complete=SETTLE_CALLBACK,
    )
    await queries.set_documents_batch(
        conn, batch.id, [d.id for d in documents], [d.content_version for d in documents]
    )
    return batch


async def add_documents(
    app: App, library_id: int, documents: Sequence[DocumentIn], *, tenant: str
) -> tuple[list[DocumentRecord], Batch | None]:
    """Add documents (pending) and submit the batch that indexes them; return both.

    One transaction: the documents and their batch commit together, or neither does.
    """
    checked = [check_document(d, f"documents.{n}") for n, d in enumerate(documents)]
    if TASK not in app.tasks:
        raise InvalidBatchError("the vectors workload is not used by this app", field="task")
    await app.open()

    async def work(
        conn: psycopg.AsyncConnection[Any],
    ) -> tuple[list[DocumentRecord], Batch | None]:
        if await queries.get_library(conn, tenant, library_id) is None:
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id")
        try:
            added = await queries.insert_documents(
                conn, library_id, [(d.metadata or {}, d.text, d.chunks) for d in checked]
            )
        except psycopg.errors.ForeignKeyViolation:
            # The library was deleted after the check above (the insert waited on its row).
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id") from None
        return added, await _submit_indexing(app, conn, tenant, library_id, added)

    added, batch = await app.db.run_in_transaction(work)
    if batch is not None:
        added = [_with_batch(d, batch.id) for d in added]
    return added, batch


_IMPORT_KEYS = frozenset({"text", "chunks", "metadata"})
# An import sends COPY data in pieces of about this many characters: one write per ~1 MB
# instead of one per document (psycopg's write_row per row cost 0.7 s per 20,000 here).
IMPORT_COPY_CHUNK_CHARS = 1 << 20
# COPY's text format: a backslash, tab, newline or carriage return in a value is escaped.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_row(number: int, document: DocumentIn) -> str:
    """Return a staged document as one line of COPY text: line, metadata, body, chunks."""
    metadata = orjson.dumps(document.metadata or {}).decode().translate(_COPY_ESCAPES)
    body = "\\N" if document.text is None else document.text.translate(_COPY_ESCAPES)
    chunks = (
        "\\N"
        if document.chunks is None
        else orjson.dumps(document.chunks).decode().translate(_COPY_ESCAPES)
    )
    return f"{number}\t{metadata}\t{body}\t{chunks}\n"


def _import_document(number: int, line: bytes) -> DocumentIn:
    """Parse and check one NDJSON line as a document; raise ImportLineError naming it."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ImportLineError(number, f"not JSON ({exc})") from None
    if not isinstance(value, dict) or not set(value) <= _IMPORT_KEYS:
        raise ImportLineError(number, 'a line is an object of "text" or "chunks", and "metadata"')
    text, chunks, metadata = value.get("text"), value.get("chunks"), value.get("metadata")
    if not (text is None or isinstance(text, str)):
        raise ImportLineError(number, "text must be a string")
    if not (chunks is None or isinstance(chunks, list)):
        raise ImportLineError(number, "chunks must be a list of strings")
    if not (metadata is None or isinstance(metadata, dict)):
        raise ImportLineError(number, "metadata must be an object")
    try:
        # JSON text holds a NUL only as the escape \u0000 (orjson refuses raw control
        # characters): without one in the line, the walk looking for NULs is skipped.
        nul_free = b"\\u0000" not in line
        return check_document(DocumentIn(text, chunks, metadata), "document", nul_free=nul_free)
    except InvalidBatchError as exc:
        raise ImportLineError(number, str(exc)) from None


async def _numbered_lines(
    lines: Iterable[bytes] | AsyncIterable[bytes],
) -> AsyncIterator[tuple[int, bytes]]:
    if isinstance(lines, AsyncIterable):
        number = 0
        async for line in lines:
            number += 1
            yield number, line
    else:
        for number, line in enumerate(lines, start=1):
            yield number, line


async def import_documents(
    app: App,
    library_id: int,
    lines: Iterable[bytes] | AsyncIterable[bytes],
    *,
    tenant: str,
    max_documents: int | None = None,
) -> tuple[int, Batch | None]:
    """Import NDJSON documents (one `{"text"|"chunks", "metadata"}` per line) as ONE
    indexing batch; return how many and the batch (None for no document).

    Streamed: each line is parsed, checked and sent on by COPY as it comes, so memory
    stays flat however many lines. All or nothing: the documents, the batch and its
    items are one transaction, and a bad line (ImportLineError naming it, blank lines
    count) rolls it all back. Not retried on a deadlock (the stream is read once): it
    only inserts, so it takes no lock another transaction could wait on in a cycle.
    """
    if TASK not in app.tasks:
        raise InvalidBatchError("the vectors workload is not used by this app", field="task")
    await app.open()
    async with app.db.connection() as conn, conn.transaction():
        if await queries.get_library(conn, tenant, library_id) is None:
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id")
        await queries.stage_import(conn)
        count = 0

        async def pieces() -> AsyncIterator[bytes]:
            nonlocal count
            rows: list[str] = []
            size = 0
            async for number, line in _numbered_lines(lines):
                if not line.strip():
                    continue
                document = _import_document(number, line)
                count += 1
                if max_documents is not None and count > max_documents:
                    raise ImportTooLargeError(
                        number, f"an import holds at most {max_documents} documents"
                    )
                row = _copy_row(number, document)
                rows.append(row)
                size += len(row)
                if size >= IMPORT_COPY_CHUNK_CHARS:
                    yield "".join(rows).encode()
                    rows, size = [], 0
            if rows:
                yield "".join(rows).encode()

        await queries.copy_staged(conn, pieces())
        if count == 0:
            return 0, None
        ranges = await queries.import_ranges(conn)
        items = (
            {"library_id": library_id, "document_id": document_id, "content_version": 1}
            for first, last in ranges
            for document_id in range(first, last + 1)
        )
        batch = await app.submit_in(conn, TASK, items, tenant=tenant, on_complete=SETTLE_CALLBACK)
        try:
            await queries.insert_staged(conn, library_id, batch.id)
        except psycopg.errors.ForeignKeyViolation:
            # The library was deleted after the check above: nothing is kept.
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id") from None
    return count, batch


def _with_batch(document: DocumentRecord, batch_id: int) -> DocumentRecord:
    fields = {f: getattr(document, f) for f in DocumentRecord.__dataclass_fields__}
    return DocumentRecord(**{**fields, "batch_id": batch_id})


async def get_document(
    app: App, library_id: int, document_id: int, *, tenant: str
) -> DocumentRecord:
    """Return the document; raise DocumentNotFoundError."""
    await app.open()
    async with app.db.connection() as conn:
        document = await queries.get_document(conn, tenant, library_id, document_id)
    if document is None:
        raise DocumentNotFoundError(f"no document {document_id}", field="document_id")
    return document


async def list_documents(
    app: App,
    library_id: int,
    *,
    tenant: str,
    after: int = 0,
    limit: int = 100,
    status: str | None = None,
) -> list[DocumentRecord]:
    """Return a page of the library's documents (LibraryNotFoundError if it has none such)."""
    await app.open()
    async with app.db.connection() as conn:
        if await queries.get_library(conn, tenant, library_id) is None:
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id")
        return await queries.list_documents(
            conn, tenant, library_id, after=after, limit=limit, status=status
        )


async def status_counts(app: App, library_id: int, *, tenant: str) -> dict[str, int]:
    """Return how many of the library's documents are in each status."""
    await app.open()
    async with app.db.connection() as conn:
        return await queries.document_status_counts(conn, tenant, library_id)


async def _document_stale_or_missing(
    conn: psycopg.AsyncConnection[Any], tenant: str, library_id: int, document_id: int
) -> Exception:
    current = await queries.get_document(conn, tenant, library_id, document_id)
    if current is None:
        return DocumentNotFoundError(f"no document {document_id}", field="document_id")
    return VersionMismatchError(
        f"document {document_id} is at version {current.version}",
        current_version=current.version,
    )


async def update_document(
    app: App,
    library_id: int,
    document_id: int,
    *,
    tenant: str,
    version: int,
    metadata: dict[str, Any],
) -> DocumentRecord:
    """Replace the document's metadata at `version` (VersionMismatchError if it moved on)."""
    _check_json(metadata, "metadata")
    await app.open()

    async def work(conn: psycopg.AsyncConnection[Any]) -> DocumentRecord:
        updated = await queries.update_document(
            conn, tenant, library_id, document_id, version=version, metadata=metadata
        )
        if updated is None:
            raise await _document_stale_or_missing(conn, tenant, library_id, document_id)
        return updated

    return await app.db.run_in_transaction(work)


async def reindex_documents(
    app: App,
    library_id: int,
    document_ids: Sequence[int],
    *,
    tenant: str,
    version: int | None = None,
    content: DocumentIn | None = None,
) -> tuple[list[DocumentRecord], Batch | None]:
    """Index documents again (with new content, for one document, when given).

    Each gets a new content version and is pending; the indexing of an older version
    that is still running then commits nothing. With `version` (one document), only
    at that version (VersionMismatchError otherwise).
    """
    if content is not None:
        check_document(content)
        if len(document_ids) != 1:
            raise InvalidBatchError("new content re-indexes one document", field="document_ids")
    await app.open()

    async def work(
        conn: psycopg.AsyncConnection[Any],
    ) -> tuple[list[DocumentRecord], Batch | None]:
        changed = await queries.reindex_documents(
            conn,
            tenant,
            library_id,
            document_ids,
            version=version,
            content=None if content is None else (content.text, content.chunks),
        )
        if len(document_ids) == 1 and not changed:
            raise await _document_stale_or_missing(conn, tenant, library_id, document_ids[0])
        return changed, await _submit_indexing(app, conn, tenant, library_id, changed)

    changed, batch = await app.db.run_in_transaction(work)
    if batch is not None:
        changed = [_with_batch(d, batch.id) for d in changed]
    return changed, batch


async def delete_document(
    app: App, library_id: int, document_id: int, *, tenant: str, version: int
) -> None:
    """Delete the document at `version` and its chunks, in one transaction.

    The chunk table has no foreign key to the documents (a library delete would lock them
    all), so the chunks are deleted here, by a statement after the document's own.
    """
    await app.open()

    async def work(conn: psycopg.AsyncConnection[Any]) -> None:
        if not await queries.delete_document(
            conn, tenant, library_id, document_id, version=version
        ):
            raise await _document_stale_or_missing(conn, tenant, library_id, document_id)
        await queries.delete_document_chunks(conn, library_id, document_id)

    await app.db.run_in_transaction(work)


async def list_chunks(
    app: App, library_id: int, document_id: int, *, tenant: str, after: int = -1, limit: int = 100
) -> list[ChunkRow]:
    """Return a page of the document's chunks (DocumentNotFoundError for another's)."""
    await app.open()
    async with app.db.connection() as conn:
        if await queries.get_document(conn, tenant, library_id, document_id) is None:
            raise DocumentNotFoundError(f"no document {document_id}", field="document_id")
        try:
            return await queries.list_chunks(
                conn, library_id, document_id, after=after, limit=limit
            )
        except psycopg.errors.UndefinedTable:
            # The library was deleted between the two statements.
            raise DocumentNotFoundError(f"no document {document_id}", field="document_id") from None


async def search(
    app: App,
    library_id: int,
    *,
    tenant: str,
    text: str | None = None,
    vector: Sequence[float] | None = None,
    k: int = 10,
    metadata_filter: dict[str, Any] | None = None,
    exact: bool = False,
    ef_search: int = DEFAULT_EF_SEARCH,
    max_scan_tuples: int = MAX_SCAN_TUPLES,
) -> list[SearchHit]:
    """Return the `k` chunks nearest to `text` (embedded as the library's) or `vector`.

    `metadata_filter` keeps chunks whose document's metadata contains it (jsonb @>).
    HNSW with iterative scans by default, and an exact search of the filtered chunks when
    the scan stops short, so a filter still yields k hits when k exist; `exact` compares
    every chunk instead, at most `SearchLimits.exact_per_tenant` at once per tenant
    (SearchBusyError past it). A search past the statement timeout: SearchTimeoutError.
    """
    if (text is None) == (vector is None):
        raise InvalidBatchError("give either text or vector", field="text")
    if text is not None and not text.strip():
        raise InvalidBatchError("text must not be empty", field="text")
    if not 1 <= k <= MAX_K:
        raise InvalidBatchError(f"k must be from 1 to {MAX_K}", field="k")
    if metadata_filter is not None:
        _check_json(metadata_filter, "filter")
    library = await get_library(app, library_id, tenant=tenant)
    if text is not None:
        try:
            [query_vector] = await embedders(app).get(library.embedder).embed([text])
        except EmbedderError as exc:
            if exc.retryable:
                raise EmbedderUnavailableError(
                    f"the query could not be embedded now: {exc}",
                    retry_after_s=exc.retry_after_s or 1.0,
                ) from None
            raise InvalidBatchError(
                f"the query could not be embedded: {exc}", field="text"
            ) from None
    else:
        assert vector is not None
        try:
            query_vector = [float(x) for x in vector]
        except (OverflowError, TypeError, ValueError):
            query_vector = [math.inf]
        if not all(math.isfinite(x) for x in query_vector):
            raise InvalidBatchError("vector values must be finite numbers", field="vector")

    if len(query_vector) != library.dimension:
        raise InvalidBatchError(
            f"the vector has {len(query_vector)} values; the library's dimension is "
            f"{library.dimension}",
            field="vector",
        )
    # Cosine distance ignores the length, so the query goes as a unit vector: pgvector
    # computes in single precision, where a finite 1e300 is out of range (an error) and
    # 3e38 or 1e-300 overflow or vanish (a NaN distance, a null score). hypot does not
    # overflow.
    norm = math.hypot(*query_vector)
    if norm == 0:
        raise InvalidBatchError("a zero vector has no cosine distance", field="vector")
    query_vector = [x / norm for x in query_vector]
    ef = max(ef_search, k)
    slots = search_limits(app)
    timeout_ms = slots.limits.statement_timeout_ms
    vector_text = _vector_text(query_vector)

    async def work(conn: psycopg.AsyncConnection[Any]) -> list[SearchRow]:
        try:
            await queries.search_settings(
                conn,
                ef_search=ef,
                max_scan_tuples=max_scan_tuples,
                statement_timeout_ms=timeout_ms,
            )
            found = await queries.search(
                conn,
                library_id,
                vector_text=vector_text,
                k=k,
                metadata_filter=metadata_filter,
                exact=exact,
            )
            if not exact and metadata_filter is not None and len(found) < k:
                # The filtered index scan ended with fewer than k (at max_scan_tuples, or
                # having exhausted the part of the graph it could reach): compare exactly
                # the chunks that pass the filter. Its result replaces the scan's whole,
                # so the hits are still one statement's snapshot. It takes an exact slot:
                # a filter the planner misjudges may make it a scan of every chunk.
                async with slots.slot(tenant):
                    found = await queries.search(
                        conn,
                        library_id,
                        vector_text=vector_text,
                        k=k,
                        metadata_filter=metadata_filter,
                        exact=True,
                    )
            return found
        except psycopg.errors.UndefinedTable:
            raise LibraryNotFoundError(f"no library {library_id}", field="library_id") from None
        except psycopg.errors.QueryCanceled:
            raise SearchTimeoutError(
                f"the search ran past the statement timeout ({timeout_ms} ms, "
                "PGBATCH_VECTORS_SEARCH_TIMEOUT_MS); narrow it with a filter, a smaller k, "
                "or search without exact"
            ) from None

    if exact:
        async with slots.slot(tenant):
            rows = await app.db.run_in_transaction(work)
    else:
        rows = await app.db.run_in_transaction(work)
    return [
        SearchHit(r.document_id, r.seq, r.content_version, r.text, r.metadata, 1.0 - r.distance)
        for r in rows
    ]


async def index_shard(app: App, items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Chunk and embed the shard's documents; queue their fenced commit (see the module)."""
    wanted = [(int(i.value["document_id"]), int(i.value["content_version"])) for i in items]
    library_id = int(items[0].value["library_id"])
    if any(int(i.value["library_id"]) != library_id for i in items):
        raise ValueError("a shard of an indexing batch mixes libraries")
    async with app.db.connection() as conn:
        library = await queries.library_by_id(conn, library_id)
        if library is None:
            return [ok({"skipped": "library deleted"}) for _ in items]
        contents = await queries.document_contents(
            conn, library_id, [d for d, _ in wanted], [v for _, v in wanted]
        )
        await conn.commit()
        await queries.mark_indexing(conn, [c[0] for c in contents], [c[1] for c in contents])
        await conn.commit()
    embedder = embedders(app).get(library.embedder)
    pieces: list[tuple[int, int, str]] = []
    for document_id, _, body, chunks in contents:
        for seq, chunk in enumerate(chunks if chunks is not None else chunk_text(body or "")):
            pieces.append((document_id, seq, chunk))
    failures: dict[int, str] = {}
    vectors: list[list[float]] = []
    try:
        vectors = await embedder.embed([text for _, _, text in pieces])
    except EmbedderError as exc:
        if exc.retryable:
            raise  # the shard is retried with the engine's backoff
        failures = {c[0]: str(exc) for c in contents}
    if not failures and len(vectors) != len(pieces):
        failures = {c[0]: "the embedder returned a wrong number of vectors" for c in contents}
    for (document_id, _, _), vector in zip(pieces, vectors, strict=False):
        if len(vector) != library.dimension:
            failures[document_id] = (
                f"the embedder returned {len(vector)} values, not {library.dimension}"
            )
    indexed = [(d, v) for d, v, _, _ in contents if d not in failures]
    chunk_rows = [
        (document_id, seq, text, _vector_text(vector))
        for (document_id, seq, text), vector in zip(pieces, vectors, strict=False)
        if document_id not in failures
    ]
    if indexed:
        statement = queries.index_commit_statement(
            library_id, [d for d, _ in indexed], [v for _, v in indexed], chunk_rows
        )
        ctx.execute_at_commit(statement.statement, statement.params)
    failed = [(d, v) for d, v, _, _ in contents if d in failures]
    if failed:
        statement = queries.index_fail_statement(
            library_id,
            [d for d, _ in failed],
            [v for _, v in failed],
            [failures[d] for d, _ in failed],
        )
        ctx.execute_at_commit(statement.statement, statement.params)
    present = {c[0] for c in contents}
    counts: dict[int, int] = {}
    for document_id, _, _ in pieces:
        counts[document_id] = counts.get(document_id, 0) + 1
    outcomes: list[Outcome] = []
    for document_id, _ in wanted:
        if document_id not in present:
            outcomes.append(ok({"document_id": document_id, "skipped": "superseded or deleted"}))
        elif document_id in failures:
            outcomes.append(error(failures[document_id]))
        else:
            outcomes.append(ok({"document_id": document_id, "chunks": counts.get(document_id, 0)}))
    return outcomes


# -- settling: what an indexing batch leaves behind when it ends ---------------------------


def _settled_state(batch: Batch, last_error: str | None) -> tuple[str, str]:
    if batch.status == "cancelled":
        return "cancelled", f"indexing batch {batch.id} was cancelled"
    reason = f"indexing batch {batch.id} ended ({batch.status}) before indexing this version"
    if last_error:
        reason += f"; its last shard failure: {last_error}"
    return "failed", reason[:2000]


async def settle_batch(app: App, batch: Batch) -> int:
    """Settle the documents an ended indexing batch did not index; return how many.

    The batch's completion callback runs this: the documents whose latest request is
    this batch and that are still pending or indexing (their shard died after its
    attempts, their item failed alone as poison, or the batch was cancelled) end
    `failed` with the reason, or `cancelled`. Their older chunks, if any, stay.

    Race-free against a re-index submitted meanwhile: ownership is the document's
    batch_id, set in the transaction that submits a batch; the settling UPDATE re-checks
    it under the row lock, so a document re-indexed meanwhile is the new batch's and is
    left alone. Safe to run twice (a callback retried): a settled document is no
    candidate any more. A batch retried after it (dead shards re-queued) still indexes
    them: its commit writes wherever the content version matches.
    """
    if batch.status == "succeeded" and batch.items_failed == 0:
        # Every item's outcome was written with its commit (or it was superseded): the
        # batch owns no unfinished document. The common case costs no query.
        return 0
    await app.open()
    _, failure = await app.last_failure(batch.id)
    status, error = _settled_state(batch, None if failure is None else failure.error)
    settled = 0
    while True:

        async def work(conn: psycopg.AsyncConnection[Any]) -> tuple[int, int]:
            return await queries.settle_documents(
                conn, batch.id, status=status, error=error, limit=SETTLE_CHUNK_ROWS
            )

        candidates, done = await app.db.run_in_transaction(work)
        settled += done
        if candidates == 0:
            return settled


async def settle_pruned(conn: psycopg.AsyncConnection[Any], batch_id: int, limit: int) -> int:
    """Retention's hook: fail what a pruned batch still owns (its callback gave up).

    A batch is not pruned while its callback is queued or running, so this only finds
    documents when the settling callback was given up; it returns how many it looked at
    (0 once none is left), as retention's hooks do. 0 in a database without the
    workload's tables: `pgbatch prune` calls it whether or not its app uses vectors.
    """
    if not await queries.documents_table_exists(conn):
        return 0
    candidates, _ = await queries.settle_documents(
        conn,
        batch_id,
        status="failed",
        error=f"indexing batch {batch_id} was pruned before it settled this version",
        limit=limit,
    )
    return candidates
