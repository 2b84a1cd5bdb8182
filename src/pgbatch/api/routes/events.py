"""Server-Sent Events: a batch's progress pushed as it changes, and a tenant-wide feed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from pgbatch.api.errors import ERRORS
from pgbatch.api.live import HubClosedError, Subscription, progress_key
from pgbatch.api.schemas import BatchId, batch_out
from pgbatch.api.state import ApiState, TenantOrQueryToken, api_state
from pgbatch.models import Batch, check_batch_id

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["events"])

EVENT_STREAM = "text/event-stream"
# Tell EventSource how long to wait before reconnecting after a dropped stream.
RETRY_MS = 1000
_SSE_HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def _event_schema(*, with_id: bool) -> dict[str, Any]:
    """Return the OpenAPI schema of one event of a stream, its data a batch as JSON.

    It is the stream's `itemSchema` (OpenAPI 3.2's name, which schemathesis reads in 3.1
    documents too), not its `schema`: a client generator reads `schema` as the whole body,
    and openapi-python-client's client then failed to parse the stream as one event.
    """
    properties: dict[str, Any] = {
        "event": {"type": "string", "enum": ["progress", "end"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"$ref": "#/components/schemas/BatchOut"},
        },
    }
    if with_id:
        properties["id"] = {"type": "string", "pattern": "^[0-9]+-[0-9]+-[0-9]+$"}
    return {
        # Named, so that a client generator names its class after it (api/openapi.py).
        "title": "BatchEvent" if with_id else "TenantEvent",
        "type": "object",
        "properties": properties,
        "required": list(properties),
    }


def _event_id(batch: Batch) -> str:
    return "-".join(str(part) for part in progress_key(batch))


def _parse_event_id(value: str | None) -> tuple[int, int, int] | None:
    # An id this server did not write is ignored: the stream starts from the current state.
    # ASCII digits only: isdigit() alone accepts "²", which int() refuses.
    if not value:
        return None
    parts = value.strip().split("-")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() and len(p) < 19 for p in parts):
        return None
    return (int(parts[0]), int(parts[1]), int(parts[2]))


def _frame(event: str, batch: Batch, *, with_id: bool = True) -> bytes:
    # waiting_reason is left out: it is not computed per event (GET it, or /v1/workers).
    data = orjson.dumps(batch_out(batch).model_dump(mode="json", exclude={"waiting_reason"}))
    head = f"id: {_event_id(batch)}\n" if with_id else ""
    return f"{head}event: {event}\n".encode() + b"data: " + data + b"\n\n"


@router.get(
    "/batches/{batch_id}/events",
    response_class=StreamingResponse,
    responses=ERRORS(
        404,
        extra={
            200: {
                "description": "`progress` events (data: the batch) as it changes, throttled; a "
                "final `end` event when it ends, then the stream closes. Event ids resume with "
                "Last-Event-ID.",
                "content": {EVENT_STREAM: {"itemSchema": _event_schema(with_id=True)}},
            },
            204: {"description": "The batch had ended and Last-Event-ID shows its end was seen."},
        },
    ),
)
async def batch_events(
    request: Request,
    tenant: TenantOrQueryToken,
    batch_id: BatchId,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=100)] = None,
) -> Response:
    """Push the batch's progress as it changes (from NOTIFY, not polling) until it ends."""
    state = api_state(request)
    # An id no batch can have never enters the hub (its reads would fail on it).
    check_batch_id(batch_id)
    # Subscribe before reading, so a change between the two is not missed.
    sub = state.hub.subscribe(tenant, batch_id)
    try:
        batch = await state.app.get_batch(batch_id, tenant=tenant)
    except BaseException:
        state.hub.unsubscribe(sub)
        raise
    seen = _parse_event_id(last_event_id)
    if batch.is_final and seen is not None and seen >= progress_key(batch):
        state.hub.unsubscribe(sub)
        return Response(status_code=204)
    return StreamingResponse(
        _stream(state, sub, [batch], _batch_frames(seen)),
        media_type=EVENT_STREAM,
        headers=_SSE_HEADERS,
    )


# Turns what arrived into frames, and says whether the stream is over.
Render = Callable[[list[Batch]], tuple[list[bytes], bool]]


def _batch_frames(seen: tuple[int, int, int] | None) -> Render:
    """Frame a batch's newest snapshot if it is newer than what the client saw; end at its end."""

    def render(arrived: list[Batch]) -> tuple[list[bytes], bool]:
        nonlocal seen
        current = arrived[-1] if arrived else None
        if current is None or (seen is not None and progress_key(current) <= seen):
            return [], False
        seen = progress_key(current)
        if current.is_final:
            return [_frame("end", current)], True
        return [_frame("progress", current)], False

    return render


def _tenant_frames(arrived: list[Batch]) -> tuple[list[bytes], bool]:
    """Frame every snapshot that arrived; the tenant's feed never ends by itself."""
    frames = [_frame("end" if b.is_final else "progress", b, with_id=False) for b in arrived]
    return frames, False


async def _stream(
    state: ApiState, sub: Subscription, first: list[Batch], render: Render
) -> AsyncIterator[bytes]:
    """Send what `sub` receives, framed by `render`, with keep-alives, until it is over."""
    try:
        yield f"retry: {RETRY_MS}\n\n".encode()
        arrived = first
        while True:
            frames, over = render(arrived)
            for frame in frames:
                yield frame
            if over:
                return
            try:
                arrived = await sub.next(state.settings.sse_keepalive_s)
            except HubClosedError:
                return
            if not arrived:
                yield b": keep-alive\n\n"
    finally:
        state.hub.unsubscribe(sub)


@router.get(
    "/events",
    response_class=StreamingResponse,
    responses=ERRORS(
        extra={
            200: {
                "description": "`progress` events (data: a batch) for every batch of the tenant "
                "that changes, throttled per batch. No ids: read GET /v1/batches first.",
                "content": {EVENT_STREAM: {"itemSchema": _event_schema(with_id=False)}},
            }
        }
    ),
)
async def tenant_events(request: Request, tenant: TenantOrQueryToken) -> StreamingResponse:
    """Push every change of the tenant's batches (the dashboard's list page uses this)."""
    state = api_state(request)
    sub = state.hub.subscribe(tenant, None)
    return StreamingResponse(
        _stream(state, sub, [], _tenant_frames), media_type=EVENT_STREAM, headers=_SSE_HEADERS
    )
