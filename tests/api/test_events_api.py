"""Server-Sent Events over real HTTP: a batch's progress, resuming, throttling, fan-out
without polling, and the tenant-wide feed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgbatch.api.state import ApiState
from tests.api.conftest import RunningApi, StartApi
from tests.api.support import (
    SseEvent,
    assert_error,
    collect_until_end,
    running_etag,
    sse_events,
)
from tests.helpers import wait_until

TIMEOUT_S = 30.0


def hub_of(running: RunningApi) -> Any:
    """Return the ProgressHub of the running API process."""
    state: ApiState = running.uvicorn.config.app.state.pgbatch
    return state.hub


async def submit(client: httpx.AsyncClient, task: str, items: list[Any], **options: Any) -> int:
    """Submit a batch and return its id."""
    response = await client.post("/v1/batches", json={"task": task, "items": items, **options})
    assert response.status_code == 201, response.text
    batch_id: int = response.json()["id"]
    return batch_id


@contextlib.asynccontextmanager
async def events_of(
    client: httpx.AsyncClient, url: str, **kwargs: Any
) -> AsyncIterator[AsyncIterator[SseEvent]]:
    """Open an event stream; yield its events."""
    async with client.stream("GET", url, **kwargs) as response:
        yield sse_events(response)


def assert_increasing(events: list[SseEvent]) -> None:
    """Check that the event ids grow strictly."""
    keys = [e.key for e in events]
    assert keys == sorted(set(keys)), keys


@pytest.mark.asyncio
async def test_a_stream_pushes_changes_then_the_end_and_closes(api: RunningApi) -> None:
    async with api.client() as client:
        batch_id = await submit(client, "gated", [1, 2])
        url = f"/v1/batches/{batch_id}"
        seen: list[SseEvent] = []
        async with events_of(client, f"{url}/events") as events:
            first = await anext(events)
            seen.append(first)
            assert first.event == "progress"
            assert first.data["id"] == batch_id and not first.data["is_final"]
            # A change made while the stream is open is pushed to it.
            patched = await client.patch(url, json={"priority": 5}, headers={"If-Match": "*"})
            assert patched.status_code == 200, patched.text
            async for event in events:
                seen.append(event)
                if event.data["priority"] == 5:
                    break
            assert seen[-1].event == "progress"
            assert seen[-1].id == f"{patched.json()['version']}-0-0"
            api.gate.set()
            rest = [event async for event in events]  # ends: the server closes the stream
        seen += rest
        assert rest and rest[-1].event == "end", [e.event for e in rest]
        assert [e.event for e in seen[:-1]] == ["progress"] * (len(seen) - 1)
        assert rest[-1].data["status"] == "succeeded"
        assert rest[-1].data["items_ok"] == 2 and rest[-1].data["is_final"]
        assert_increasing(seen)
        # Progress within one version only grows.
        done = [e.data["items_done"] for e in seen]
        assert done == sorted(done)


@pytest.mark.asyncio
async def test_last_event_id_resumes_without_repeating_an_event(api: RunningApi) -> None:
    async with api.client() as client:
        batch_id = await submit(client, "gated", [1])
        url = f"/v1/batches/{batch_id}"
        await running_etag(client, url)  # the claim moves the version: let it happen first
        async with events_of(client, f"{url}/events") as events:
            first = await anext(events)
        await client.patch(url, json={"priority": 3}, headers={"If-Match": "*"})
        async with events_of(client, f"{url}/events", headers={"Last-Event-ID": first.id}) as ev:
            second = await anext(ev)
        assert second.key > first.key
        assert second.data["priority"] == 3
        # Resuming from the latest event: the next one is news, not that one again.
        resumed = {"Last-Event-ID": second.id}
        async with events_of(client, f"{url}/events", headers=resumed) as events:
            await client.patch(url, json={"priority": 4}, headers={"If-Match": "*"})
            third = await anext(events)
        assert third.key > second.key
        assert third.data["priority"] == 4
        api.gate.set()
        async with client.stream("GET", f"{url}/events", headers={"Last-Event-ID": third.id}) as r:
            tail = await collect_until_end(r)
        assert all(e.key > third.key for e in tail)
        end = tail[-1]
        # The end was seen: nothing more to say.
        after_end = await client.get(f"{url}/events", headers={"Last-Event-ID": end.id})
        assert after_end.status_code == 204
        assert after_end.content == b""
        # An older id, or one this server did not write, gets the end at once.
        for last_id in (third.id, "garbage", "1-2", "99999999999999999999-0-0", ""):
            headers = {"Last-Event-ID": last_id}
            async with client.stream("GET", f"{url}/events", headers=headers) as response:
                assert [e.id for e in await collect_until_end(response)] == [end.id]


# Alone under xdist: it needs the batch to change faster than the throttle lets events
# out, and beside the other worker it changed too few times to show one (115 changes
# in 10 s, against a bound of 85 events).
@pytest.mark.exclusive
@pytest.mark.asyncio
async def test_events_of_a_fast_batch_are_throttled(start_api: StartApi, database_url: str) -> None:
    interval_s = 0.25
    async with (
        start_api(worker=False, sse_min_interval_s=interval_s) as running,
        running.client() as client,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener,
    ):
        # Count every change the database announces, unthrottled, as a baseline.
        await listener.execute("LISTEN pgbatch_progress")
        batch_id = await submit(client, "echo", list(range(1_500)), shard_size=1)
        async with client.stream("GET", f"/v1/batches/{batch_id}/events") as response:
            events = sse_events(response)
            seen = [await anext(events)]
            started = time.monotonic()
            worker = running.app.worker(concurrency=4)
            working = asyncio.create_task(worker.run())
            try:
                seen += [event async for event in events]
            finally:
                elapsed_s = time.monotonic() - started
                worker.request_stop()
                await working
        notified = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                async for notice in listener.notifies():
                    notified += notice.payload == str(batch_id)
    assert seen[-1].event == "end" and seen[-1].data["items_ok"] == 1_500
    assert_increasing(seen)
    # At most one read (hence one event) per interval, plus the first and the last: twice
    # that is a generous bound. Without the throttle every announced change is an event.
    bound = 2 * elapsed_s / interval_s + 3
    print(
        f"\nthrottle: {len(seen)} events for {notified} announced changes in {elapsed_s:.2f} s "
        f"(bound {bound:.0f})"
    )
    assert len(seen) <= bound, (len(seen), elapsed_s)
    assert notified > 2 * bound, "the batch changed too few times to show a throttle"


def _metric(text: str, name: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return float(sample.value)
    raise AssertionError(f"no metric {name}")


@pytest.mark.asyncio
async def test_many_streams_on_one_batch_share_one_read_per_change(api: RunningApi) -> None:
    clients = 20
    hub = hub_of(api)
    async with api.client() as client, contextlib.AsyncExitStack() as stack:
        batch_id = await submit(client, "gated", [1])
        url = f"/v1/batches/{batch_id}/events"
        streams = []
        for _ in range(clients):
            response = await stack.enter_async_context(client.stream("GET", url))
            events = sse_events(response)
            first = await anext(events)
            assert first.data["id"] == batch_id
            streams.append(events)
        assert hub.subscribers == clients
        metrics = await client.get("/metrics")
        assert _metric(metrics.text, "pgbatch_sse_streams") == clients
        reads_before = hub.reads
        api.gate.set()

        async def to_the_end(events: AsyncIterator[SseEvent]) -> SseEvent:
            return [event async for event in events][-1]

        ends = await asyncio.gather(*(to_the_end(events) for events in streams))
        reads = hub.reads - reads_before
    assert all(end.event == "end" and end.data["is_final"] for end in ends)
    assert len({end.id for end in ends}) == 1
    print(f"\nfan-out: {clients} streams got their end from {reads} database reads")
    # The hub reads a changed batch once for all its streams (a per-client poll would
    # read at least once per stream).
    assert reads < clients / 4, reads
    await wait_until(lambda: hub.subscribers == 0, TIMEOUT_S, message="streams leaked")
    async with api.client() as client:
        assert _metric((await client.get("/metrics")).text, "pgbatch_sse_streams") == 0


@pytest.mark.asyncio
async def test_the_tenant_stream_carries_only_that_tenants_batches(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme", "globex")) as running,
        running.client("acme") as acme,
        running.client("globex") as globex,
        # EventSource sends no headers: the token may come as a query parameter.
        running.client() as anonymous,
    ):
        url = f"/v1/events?access_token={running.tokens['acme']}"
        async with anonymous.stream("GET", url) as response:
            events = sse_events(response)
            foreign = await submit(globex, "echo", [1, 2, 3])
            await running.app.wait(foreign, timeout_s=TIMEOUT_S)
            own = {await submit(acme, "echo", [1]), await submit(acme, "flaky", ["fail"])}
            ended: set[int] = set()
            seen: list[SseEvent] = []
            async for event in events:
                seen.append(event)
                if event.event == "end":
                    ended.add(event.data["id"])
                if own <= ended:
                    break
    assert {e.data["id"] for e in seen} == own, [(e.event, e.data["id"]) for e in seen]
    assert all(e.id is None for e in seen)


@pytest.mark.asyncio
async def test_event_stream_errors(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme", "globex"), worker=False) as running,
        running.client("acme") as acme,
        running.client("globex") as globex,
        running.client() as anonymous,
    ):
        batch_id = await submit(acme, "echo", [1])
        url = f"/v1/batches/{batch_id}/events"
        assert_error(await anonymous.get(url), 401, field="Authorization")
        assert_error(await anonymous.get("/v1/events"), 401, field="Authorization")
        assert_error(await anonymous.get(f"{url}?access_token=nope"), 401, field="Authorization")
        assert_error(await globex.get(url), 404, code="batch_not_found")
        assert_error(await acme.get(f"/v1/batches/{batch_id + 1}/events"), 404)
        token = running.tokens["acme"]
        async with anonymous.stream("GET", f"{url}?access_token={token}") as response:
            first = await anext(sse_events(response))
        assert first.data["id"] == batch_id
        assert hub_of(running).subscribers <= 1  # the one just closed may still be leaving
        await wait_until(lambda: hub_of(running).subscribers == 0, TIMEOUT_S)
