"""What the OpenAI Files and Batches routes do, over the workload's tables and a pgbatch App.

A request file is stored as uploaded, in chunks. Creating a batch reads it back twice, a
chunk at a time: once to validate every line as OpenAI does (a bad line, a duplicate
`custom_id` or a `url` other than the batch's endpoint fails the batch with line numbers,
and nothing is submitted), then to stream the requests into a pgbatch batch through
`submit_requests`. An OpenAI batch's status, counts and times are derived from that
pgbatch batch when read; its output and error files are its results, streamed by
`output_lines`, never copied.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import IO, TYPE_CHECKING, Any

import orjson

from pgbatch.errors import BatchNotFoundError, InvalidBatchError
from pgbatch.workloads.llm import queries as llm_queries
from pgbatch.workloads.llm.batches import check_upstream, output_lines, submit_requests
from pgbatch.workloads.llm.db import openai as queries
from pgbatch.workloads.llm.requests import (
    ENDPOINTS,
    MAX_REPORTED_ERRORS,
    MAX_REQUEST_BYTES,
    LineError,
    LlmRequest,
    RequestFileError,
    parse_request_line,
)

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = [
    "COMPLETION_WINDOWS",
    "FILE_PURPOSES",
    "BatchApiError",
    "BatchFile",
    "batch_object",
    "cancel_batch",
    "check_batch_options",
    "check_lines",
    "create_batch",
    "delete_file",
    "file_content",
    "file_lines",
    "file_object",
    "get_batch",
    "get_file",
    "list_batches",
    "list_files",
    "openai_status",
    "parse_batch_id",
    "parse_file_id",
    "run_batch_id",
    "store_file",
]

# OpenAI accepts only this window; a batch not done within it is expired (see get_batch).
COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}
# What an upload may be for: OpenAI's other purposes (fine-tune, assistants) are not ours.
FILE_PURPOSES = ("batch",)
# OpenAI's metadata limits: 16 pairs, keys of 64 characters, values of 512.
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
# A create validates and submits within one request; a batch still `validating` this
# long after its creation belongs to a create that died (a server killed mid-request):
# its next read resumes it or fails it (see _recover_if_stale). Validating 200 MB takes
# well under a minute; a create still at work past this whose batch was failed cancels
# what it then submits.
VALIDATION_STALE = timedelta(minutes=30)
# Lines of an output or error file gathered before one write to the client (and one
# look-up of custom_ids the engine's own failures lack).
LINES_PER_WRITE = 500

FILE_PREFIX = "file-"
BATCH_PREFIX = "batch_"
# The output and error files of batch N are `file-batch_N-output` / `file-batch_N-error`.
OUTPUT_KINDS = ("output", "error")


class BatchApiError(Exception):
    """A refusal in OpenAI's terms: HTTP status, error code, message and the parameter."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class BatchFile:
    """A file id resolved: an uploaded file's id, or a batch's output or error file."""

    file_id: int | None = None
    batch_id: int | None = None
    kind: str | None = None


def _not_found(what: str, given: str, param: str | None = None) -> BatchApiError:
    return BatchApiError(404, "not_found", f"No {what} found with id '{given[:100]}'.", param)


def _number(text: str) -> int | None:
    # Ids are bigints: anything else (or out of range) names nothing.
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        return None
    value = int(text)
    return value if 0 < value < 2**63 else None


def parse_file_id(given: str, param: str | None = None) -> BatchFile:
    """Resolve `file-N` or `file-batch_N-output|error`, or raise a 404."""
    if given.startswith(FILE_PREFIX + BATCH_PREFIX):
        batch, _, kind = given[len(FILE_PREFIX + BATCH_PREFIX) :].partition("-")
        number = _number(batch)
        if number is not None and kind in OUTPUT_KINDS:
            return BatchFile(batch_id=number, kind=kind)
    elif given.startswith(FILE_PREFIX):
        number = _number(given[len(FILE_PREFIX) :])
        if number is not None:
            return BatchFile(file_id=number)
    raise _not_found("file", given, param)


def parse_batch_id(given: str) -> int:
    """Return the number of `batch_N`, or raise a 404."""
    number = _number(given[len(BATCH_PREFIX) :]) if given.startswith(BATCH_PREFIX) else None
    if number is None:
        raise _not_found("batch", given)
    return number


def _unix(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


# -- files -----------------------------------------------------------------------------------


def file_object(row: queries.FileRow) -> dict[str, Any]:
    """Return an uploaded file as OpenAI's file object."""
    return {
        "id": f"{FILE_PREFIX}{row.id}",
        "object": "file",
        "bytes": row.bytes,
        "created_at": _unix(row.created_at),
        "filename": row.filename,
        "purpose": row.purpose,
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _output_file_object(row: queries.BatchRow, kind: str) -> dict[str, Any]:
    size = row.output_bytes if kind == "output" else row.error_bytes
    return {
        "id": _output_file_id(row.id, kind),
        "object": "file",
        "bytes": size if size is not None else 0,
        "created_at": _unix(row.finished_at),
        "filename": f"batch_{row.id}_{kind}.jsonl",
        "purpose": "batch_output",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }


def _output_file_id(batch_id: int, kind: str) -> str:
    return f"{FILE_PREFIX}{BATCH_PREFIX}{batch_id}-{kind}"


async def store_file(
    app: App, tenant: str, *, filename: str, purpose: str, content: IO[bytes], size: int
) -> dict[str, Any]:
    """Store an uploaded file and return its file object."""
    if purpose not in FILE_PURPOSES:
        raise BatchApiError(
            400,
            "invalid_value",
            f"purpose must be one of {', '.join(FILE_PURPOSES)}, not {purpose[:100]!r}",
            "purpose",
        )
    row = await queries.store_file(app.db, tenant, filename, purpose, content, size)
    return file_object(row)


async def get_file(app: App, tenant: str, given: str) -> dict[str, Any]:
    """Return the file object `given` names (an upload, or a finished batch's output)."""
    resolved = parse_file_id(given)
    if resolved.file_id is not None:
        row = await queries.get_file(app.db, tenant, resolved.file_id)
        if row is None:
            raise _not_found("file", given)
        return file_object(row)
    batch = await _finished_batch(app, tenant, resolved, given)
    if batch.output_bytes is None or batch.error_bytes is None:
        batch = await _count_output_bytes(app, batch)
    assert resolved.kind is not None
    return _output_file_object(batch, resolved.kind)


async def _finished_batch(
    app: App, tenant: str, resolved: BatchFile, given: str
) -> queries.BatchRow:
    assert resolved.batch_id is not None and resolved.kind is not None
    row = await queries.get_batch(app.db, tenant, resolved.batch_id)
    # A batch's output files exist once it has ended, as OpenAI names them only then.
    if row is None or row.batch_id is None or row.finished_at is None:
        raise _not_found("file", given)
    return row


async def _count_output_bytes(app: App, row: queries.BatchRow) -> queries.BatchRow:
    sizes = {}
    for kind in OUTPUT_KINDS:
        sizes[kind] = 0
        async for chunk in _output_chunks(app, row, kind):
            sizes[kind] += len(chunk)
    await queries.set_file_sizes(app.db, row.tenant, row.id, sizes["output"], sizes["error"])
    refreshed = await queries.get_batch(app.db, row.tenant, row.id)
    assert refreshed is not None
    return refreshed


async def list_files(
    app: App, tenant: str, *, after: str | None, limit: int, purpose: str | None
) -> dict[str, Any]:
    """Return a page of the tenant's uploaded files, newest first, as OpenAI's list."""
    cursor = parse_file_id(after, "after").file_id if after is not None else None
    if after is not None and cursor is None:
        raise _not_found("file", after, "after")
    rows = await queries.list_files(app.db, tenant, after=cursor, limit=limit + 1, purpose=purpose)
    data = [file_object(row) for row in rows[:limit]]
    return _page(data, has_more=len(rows) > limit)


def _page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


async def delete_file(app: App, tenant: str, given: str) -> dict[str, Any]:
    """Delete an uploaded file (batches made from it keep their requests)."""
    resolved = parse_file_id(given)
    if resolved.file_id is None:
        await _finished_batch(app, tenant, resolved, given)  # 404 unless it is there
        raise BatchApiError(
            400,
            "invalid_request",
            "a batch's output and error files are its results: they go with the batch "
            "(retention), not one by one",
            "file_id",
        )
    if not await queries.delete_file(app.db, tenant, resolved.file_id):
        raise _not_found("file", given)
    return {"id": given, "object": "file", "deleted": True}


async def file_content(app: App, tenant: str, given: str) -> AsyncIterator[bytes]:
    """Return the file's content as chunks; raise a 404 before the first one if it is not there."""
    resolved = parse_file_id(given)
    if resolved.file_id is not None:
        if await queries.get_file(app.db, tenant, resolved.file_id) is None:
            raise _not_found("file", given)
        return queries.file_chunks(app.db, tenant, resolved.file_id)
    batch = await _finished_batch(app, tenant, resolved, given)
    assert resolved.kind is not None
    return _output_chunks(app, batch, resolved.kind)


async def _output_chunks(app: App, row: queries.BatchRow, kind: str) -> AsyncIterator[bytes]:
    """Yield a batch's output (or error) file as JSONL, a few hundred lines at a time."""
    assert row.batch_id is not None
    page: list[dict[str, Any]] = []
    async for line in output_lines(app, row.batch_id, errors=kind == "error", tenant=row.tenant):
        page.append(line)
        if len(page) >= LINES_PER_WRITE:
            yield await _jsonl(app, row.batch_id, page)
            page = []
    if page:
        yield await _jsonl(app, row.batch_id, page)


async def _jsonl(app: App, run_batch_id: int, lines: list[dict[str, Any]]) -> bytes:
    # A result the engine wrote itself (a cancelled request, attempts exhausted) carries
    # no custom_id: look those up from the requests, one query per page of lines.
    missing = {}
    for line in lines:
        if not line.get("custom_id"):
            seq = _line_seq(str(line.get("id", "")))
            if seq is not None:
                missing[seq] = line
    if missing:
        found = await queries.item_custom_ids(app.db, run_batch_id, sorted(missing))
        for seq, line in missing.items():
            line["custom_id"] = found.get(seq, "")
            error = line.get("error")
            if isinstance(error, dict) and error.get("message") == "cancelled":
                error["code"] = "batch_cancelled"
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def _line_seq(line_id: str) -> int | None:
    # Line ids are batch_req_<batch>_<seq> (batches.line_id).
    _, _, seq = line_id.rpartition("_")
    return int(seq) if seq.isdigit() else None


# -- validation ------------------------------------------------------------------------------


async def file_lines(chunks: AsyncIterator[bytes], max_line: int) -> AsyncIterator[bytes | int]:
    """Yield a file's lines in order; a line longer than `max_line` comes as its length.

    A line is never held past `max_line` bytes, so a file without a newline costs no
    more memory than one oversized request.
    """
    buffer = bytearray()
    overflow = 0  # the length of an oversized line, while its end is still to come
    async for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if overflow:
                overflow += len(piece)
            else:
                buffer += piece
                if len(buffer) > max_line:
                    overflow = len(buffer)
                    buffer.clear()
            if end < 0:
                break
            if overflow:
                yield overflow
                overflow = 0
            else:
                yield bytes(buffer)
                buffer.clear()
            start = end + 1
    if overflow:
        yield overflow
    elif buffer:
        yield bytes(buffer)


def _too_large(line: int, size: int) -> LineError:
    # The same refusal parse_request_line gives, without holding the line to parse it.
    return LineError(
        line,
        "request_too_large",
        f"the request is {size} bytes; at most {MAX_REQUEST_BYTES} are accepted per line",
        None,
    )


async def check_lines(
    lines: AsyncIterator[bytes | int], endpoint: str
) -> tuple[int, list[LineError]]:
    """Check every line of a file as OpenAI does; return the requests counted and the errors.

    The rules are `requests.check_request_lines`', over a stream read from the database:
    custom_ids are remembered as 16-byte digests, so a file of ten million requests
    holds a set, never its requests.
    """
    seen: set[bytes] = set()
    errors: list[LineError] = []
    count = 0
    number = 0
    async for raw in lines:
        number += 1
        if isinstance(raw, int):
            parsed: LlmRequest | LineError = _too_large(number, raw)
        elif not raw.strip():
            continue
        else:
            parsed = parse_request_line(raw, number, endpoint)
        if isinstance(parsed, LlmRequest) and "\x00" in parsed.custom_id:
            # PostgreSQL's text cannot hold it: such an id could not be read back.
            parsed = LineError(
                number, "invalid_custom_id", "custom_id must not contain NUL", "custom_id"
            )
        if isinstance(parsed, LlmRequest):
            digest = hashlib.blake2b(parsed.custom_id.encode(), digest_size=16).digest()
            if digest in seen:
                parsed = LineError(
                    number,
                    "duplicate_custom_id",
                    f"custom_id {parsed.custom_id[:100]!r} is on an earlier line too",
                    "custom_id",
                )
            else:
                seen.add(digest)
        if isinstance(parsed, LineError):
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(parsed)
            continue
        count += 1
    if not errors and count == 0:
        errors.append(LineError(None, "empty_file", "the file holds no request"))
    return count, errors


async def _requests(lines: AsyncIterator[bytes | int], endpoint: str) -> AsyncIterator[LlmRequest]:
    """Yield the requests of a file already checked (the second read, for the submit)."""
    number = 0
    async for raw in lines:
        number += 1
        if isinstance(raw, int):
            raise RequestFileError([_too_large(number, raw)])
        if not raw.strip():
            continue
        parsed = parse_request_line(raw, number, endpoint)
        if isinstance(parsed, LineError):
            # Files never change; this is a file replaced under the same id, if ever.
            raise RequestFileError([parsed])
        yield parsed


# -- batches ---------------------------------------------------------------------------------


def check_batch_options(
    endpoint: str, completion_window: str, metadata: dict[str, str] | None
) -> None:
    """Refuse an endpoint, window or metadata OpenAI would refuse, naming the parameter."""
    if endpoint not in ENDPOINTS:
        raise BatchApiError(
            400,
            "invalid_value",
            f"endpoint must be one of {', '.join(ENDPOINTS)}, not {endpoint[:100]!r}",
            "endpoint",
        )
    if completion_window not in COMPLETION_WINDOWS:
        raise BatchApiError(
            400,
            "invalid_value",
            f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}, "
            f"not {completion_window[:100]!r}",
            "completion_window",
        )
    if metadata is None:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise BatchApiError(
            400,
            "invalid_value",
            f"metadata holds at most {MAX_METADATA_PAIRS} pairs, not {len(metadata)}",
            "metadata",
        )
    for key, value in metadata.items():
        if "\x00" in key or "\x00" in value:
            # PostgreSQL's jsonb cannot store it.
            raise BatchApiError(
                400, "invalid_value", "metadata must not contain NUL characters", "metadata"
            )
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise BatchApiError(
                400,
                "invalid_value",
                f"a metadata key is at most {MAX_METADATA_KEY_CHARS} characters",
                "metadata",
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise BatchApiError(
                400,
                "invalid_value",
                f"metadata value of {key[:64]!r} is longer than {MAX_METADATA_VALUE_CHARS} "
                "characters",
                f"metadata.{key[:64]}",
            )


async def create_batch(
    app: App,
    tenant: str,
    *,
    input_file_id: str,
    endpoint: str,
    completion_window: str,
    metadata: dict[str, str] | None,
    cache: bool = False,
    upstream: str | None = None,
) -> dict[str, Any]:
    """Validate the input file and submit its requests; return the batch object.

    A file that fails validation makes a `failed` batch with its line errors, and no
    pgbatch batch: nothing is queued, no request reaches the upstream.
    """
    check_batch_options(endpoint, completion_window, metadata)
    if upstream is not None:
        try:
            check_upstream(app, upstream)
        except InvalidBatchError as exc:
            raise BatchApiError(400, "invalid_value", str(exc), "upstream") from None
    resolved = parse_file_id(input_file_id, "input_file_id")
    if resolved.file_id is None or await queries.get_file(app.db, tenant, resolved.file_id) is None:
        raise _not_found("file", input_file_id, "input_file_id")
    file_id = resolved.file_id
    batch_id = await queries.insert_batch(
        app.db,
        tenant,
        input_file_id=file_id,
        endpoint=endpoint,
        completion_window=completion_window,
        metadata=metadata,
    )

    def lines() -> AsyncIterator[bytes | int]:
        return file_lines(queries.file_chunks(app.db, tenant, file_id), MAX_REQUEST_BYTES)

    count, errors = await check_lines(lines(), endpoint)
    if errors:
        await queries.fail_batch(
            app.db, tenant, batch_id, [e.as_openai() for e in errors], total=count
        )
    else:
        try:
            run = await submit_requests(
                app,
                _requests(lines(), endpoint),
                tenant=tenant,
                # A retried create of the same OpenAI batch finds the batch it submitted.
                idempotency_key=f"openai-batch:{batch_id}",
                cache=cache,
                upstream=upstream,
            )
        except RequestFileError as exc:
            await queries.fail_batch(
                app.db, tenant, batch_id, [e.as_openai() for e in exc.errors], total=count
            )
        except InvalidBatchError as exc:
            # The engine refused what the lines make together (a shard of requests past
            # PGBATCH_MAX_SHARD_BYTES): the batch fails, as a bad line fails it.
            error = LineError(None, "invalid_batch", str(exc), exc.field)
            await queries.fail_batch(app.db, tenant, batch_id, [error.as_openai()], total=count)
        else:
            if run.total_items != count:
                # The file was deleted while it was read: what was submitted is not it.
                await app.cancel(run.id, tenant=tenant)
                error = LineError(None, "file_deleted", "the input file was deleted while read")
                await queries.fail_batch(app.db, tenant, batch_id, [error.as_openai()], count)
            elif not await queries.mark_submitted(app.db, tenant, batch_id, run.id, count):
                # A read found this create stale meanwhile: it linked this run (resumed),
                # or failed the batch, and then the run belongs to nothing a client sees.
                now = await queries.get_batch(app.db, tenant, batch_id)
                if now is None or now.batch_id != run.id:
                    await app.cancel(run.id, tenant=tenant)
    return await get_batch(app, tenant, f"{BATCH_PREFIX}{batch_id}")


def openai_status(row: queries.BatchRow) -> str:
    """Return the OpenAI status of a batch, from its own row and its pgbatch batch."""
    if row.status != "submitted":
        return row.status  # validating, or failed validation
    if row.expired_at is not None:
        return "expired"
    if row.run_status == "cancelled":
        # Cancelled, its running shards still stopping (the engine's "ending"), or ended.
        return "cancelled" if row.finished_at is not None else "cancelling"
    if row.finished_at is not None:
        return "completed"
    return "in_progress"


def batch_object(row: queries.BatchRow, usage: dict[str, Any] | None = None) -> dict[str, Any]:
    """Return the batch as OpenAI's batch object (`usage`: its tokens, see _usage)."""
    status = openai_status(row)
    window = COMPLETION_WINDOWS.get(row.completion_window, timedelta(hours=24))
    ended = row.finished_at is not None and row.status == "submitted"
    return {
        "id": f"{BATCH_PREFIX}{row.id}",
        "object": "batch",
        "endpoint": row.endpoint,
        "errors": {"object": "list", "data": row.errors} if row.errors else None,
        "input_file_id": f"{FILE_PREFIX}{row.input_file_id}",
        "completion_window": row.completion_window,
        "status": status,
        "output_file_id": (
            _output_file_id(row.id, "output") if ended and (row.items_ok or 0) > 0 else None
        ),
        "error_file_id": (
            _output_file_id(row.id, "error") if ended and (row.items_failed or 0) > 0 else None
        ),
        "created_at": _unix(row.created_at),
        "in_progress_at": _unix(row.in_progress_at),
        "expires_at": _unix(row.created_at + window),
        # Results are readable as they are written: there is no separate finalizing step.
        "finalizing_at": _unix(row.finished_at) if status == "completed" else None,
        "completed_at": _unix(row.finished_at) if status == "completed" else None,
        "failed_at": _unix(row.failed_at),
        "expired_at": _unix(row.expired_at),
        "cancelling_at": _unix(row.cancelling_at),
        "cancelled_at": _unix(row.finished_at) if status == "cancelled" else None,
        "request_counts": {
            "total": row.total_items or 0,
            "completed": row.items_ok or 0,
            "failed": row.items_failed or 0,
        },
        "metadata": row.metadata,
        "usage": usage,
    }


async def _usage(app: App, row: queries.BatchRow) -> dict[str, Any] | None:
    """Return the tokens the batch's requests used so far, in OpenAI's `usage` shape."""
    if row.batch_id is None:
        return None  # failed validation: nothing ran
    async with app.db.connection() as conn:
        rows = await llm_queries.batch_usage(conn, row.batch_id)
    prompt = sum(r.prompt_tokens for r in rows)
    completion = sum(r.completion_tokens for r in rows)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": sum(r.cached_tokens for r in rows)},
        "output_tokens": completion,
        # The upstream's usage is kept as prompt, completion and cached tokens only.
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt + completion,
    }


async def _batch_object(app: App, row: queries.BatchRow) -> dict[str, Any]:
    return batch_object(row, await _usage(app, row))


async def _recover_if_stale(app: App, row: queries.BatchRow) -> queries.BatchRow:
    """Resume or fail a batch whose create died while it was validating."""
    if row.status != "validating" or datetime.now(UTC) < row.created_at + VALIDATION_STALE:
        return row
    error = LineError(
        None,
        "validation_interrupted",
        "the server stopped while this batch was created; create it again",
    )
    stale_s = VALIDATION_STALE.total_seconds()
    await queries.recover_stale(app.db, row.tenant, row.id, stale_s, [error.as_openai()])
    refreshed = await queries.get_batch(app.db, row.tenant, row.id)
    assert refreshed is not None
    return refreshed


async def _expire_if_due(app: App, row: queries.BatchRow) -> queries.BatchRow:
    """Expire a batch read past its completion window: its unfinished requests stop."""
    row = await _recover_if_stale(app, row)
    window = COMPLETION_WINDOWS.get(row.completion_window)
    if (
        window is None
        or row.status != "submitted"
        or row.batch_id is None
        or row.finished_at is not None
        or row.expired_at is not None
        or row.run_status == "cancelled"
        or datetime.now(UTC) < row.created_at + window
    ):
        return row
    await app.cancel(row.batch_id, tenant=row.tenant)
    await queries.mark_expired(app.db, row.tenant, row.id)
    refreshed = await queries.get_batch(app.db, row.tenant, row.id)
    assert refreshed is not None
    return refreshed


async def get_batch(app: App, tenant: str, given: str) -> dict[str, Any]:
    """Return the batch object `given` names, expiring it first if its window has passed."""
    row = await queries.get_batch(app.db, tenant, parse_batch_id(given))
    if row is None:
        raise _not_found("batch", given)
    return await _batch_object(app, await _expire_if_due(app, row))


async def list_batches(app: App, tenant: str, *, after: str | None, limit: int) -> dict[str, Any]:
    """Return a page of the tenant's batches, newest first, as OpenAI's list."""
    cursor = None
    if after is not None:
        try:
            cursor = parse_batch_id(after)
        except BatchApiError:
            raise _not_found("batch", after, "after") from None
    rows = await queries.list_batches(app.db, tenant, after=cursor, limit=limit + 1)
    data = [await _batch_object(app, await _expire_if_due(app, row)) for row in rows[:limit]]
    return _page(data, has_more=len(rows) > limit)


async def cancel_batch(app: App, tenant: str, given: str) -> dict[str, Any]:
    """Cancel a batch: queued requests stop at once, running ones at their shard's end."""
    row = await queries.get_batch(app.db, tenant, parse_batch_id(given))
    if row is None:
        raise _not_found("batch", given)
    if openai_status(row) not in ("cancelling", "cancelled"):
        if row.batch_id is not None and await app.cancel(row.batch_id, tenant=tenant):
            await queries.mark_cancelling(app.db, tenant, row.id)
        # Read again: a cancel of our own, or a concurrent one that got there first.
        fresh = await queries.get_batch(app.db, tenant, row.id)
        assert fresh is not None  # rows go only with their pgbatch batch (retention)
        row = fresh
    status = openai_status(row)
    if status not in ("cancelling", "cancelled"):
        raise BatchApiError(
            409, "invalid_state", f"Cannot cancel a batch with status '{status}'.", None
        )
    return await _batch_object(app, row)


async def run_batch_id(app: App, given: str) -> int:
    """Return the pgbatch batch id `given` names: itself if numeric, or `batch_N`'s run."""
    if given.isascii() and given.isdigit():
        return int(given)
    try:
        number = parse_batch_id(given)
    except BatchApiError:
        raise BatchNotFoundError(
            f"{given[:100]!r} is neither a batch number nor an OpenAI batch id (batch_N)"
        ) from None
    await app.open()
    exists, run = await queries.run_batch_of(app.db, number)
    if not exists:
        raise BatchNotFoundError(f"no OpenAI batch {given[:100]}")
    if run is None:
        raise BatchNotFoundError(f"OpenAI batch {given[:100]} ran nothing (it failed validation)")
    return run
