"""Helpers the API tests share: the error shape, row counts, and a Server-Sent Events reader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from tests.api.conftest import RunningApi
from tests.helpers import wait_until

# A stream that shows nothing for this long is stuck: the test fails instead of hanging.
STREAM_TIMEOUT_S = 30.0


def assert_error(
    response: httpx.Response, status: int, *, code: str | None = None, field: str | None = None
) -> dict[str, Any]:
    """Check that `response` is an error in the API's one JSON shape; return its `error`."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "field"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["field"] is None or isinstance(error["field"], str), error
    if code is not None:
        assert error["code"] == code, error
    if field is not None:
        assert error["field"] == field, error
    return dict(error)


async def count_rows(running: RunningApi, table: str) -> int:
    """Count the rows of `pgbatch.<table>` (what a request really wrote)."""
    assert table.isidentifier()
    async with running.app.db.connection() as conn:
        row = await (await conn.execute(f"SELECT count(*) FROM pgbatch.{table}")).fetchone()
    assert row is not None
    return int(row[0])


async def assert_nothing_written(running: RunningApi) -> None:
    """Check that no batch, item or shard exists."""
    counts = {t: await count_rows(running, t) for t in ("batches", "items", "shards")}
    assert counts == {"batches": 0, "items": 0, "shards": 0}, counts


async def running_etag(client: httpx.AsyncClient, url: str) -> str:
    """Wait until the batch at `url` runs (its first claim moves its version); return its ETag.

    A `gated` batch then keeps that version until the test changes it.
    """

    async def running() -> str | None:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        return response.headers["etag"] if response.json()["status"] == "running" else None

    etag: str = await wait_until(running, STREAM_TIMEOUT_S, message=f"{url} never ran")
    return etag


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched Server-Sent Event."""

    event: str
    data: Any
    id: str | None

    @property
    def key(self) -> tuple[int, ...]:
        """Return the event id as a comparable tuple (ids are `version-shards-items`)."""
        assert self.id is not None, self
        return tuple(int(part) for part in self.id.split("-"))


async def sse_events(response: httpx.Response) -> AsyncIterator[SseEvent]:
    """Parse a `text/event-stream` response into events, as EventSource does.

    Comments (keep-alives) and blocks without data (the `retry:` line) dispatch nothing.
    Ends when the server closes the stream; fails when no event came for STREAM_TIMEOUT_S
    (keep-alives do not count).
    """
    assert response.status_code == 200, response.status_code
    assert response.headers["content-type"].startswith("text/event-stream"), response.headers
    event, event_id, data = "message", None, []
    lines = response.aiter_lines()
    deadline = asyncio.get_running_loop().time() + STREAM_TIMEOUT_S
    while True:
        try:
            async with asyncio.timeout_at(deadline):
                line = await anext(lines)
        except StopAsyncIteration:
            return
        if line == "":
            if data:
                yield SseEvent(event, orjson.loads("\n".join(data)), event_id)
                deadline = asyncio.get_running_loop().time() + STREAM_TIMEOUT_S
            event, event_id, data = "message", None, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


async def collect_until_end(response: httpx.Response) -> list[SseEvent]:
    """Read a batch's stream to its end; check the stream closes right after the `end` event."""
    seen: list[SseEvent] = []
    async for event in sse_events(response):
        seen.append(event)
    assert seen and seen[-1].event == "end", [e.event for e in seen]
    assert all(e.event == "progress" for e in seen[:-1]), [e.event for e in seen]
    return seen
