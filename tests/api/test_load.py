"""A bounded load test on loopback: 50 event streams and 50 submitters at once.

A fixed amount of work (no open-ended run): 50 watched batches that take a few seconds,
one event stream on each, and 50 clients that each submit, read and list a fixed number
of times meanwhile. No request may fail and no stream may miss its batch's end. The
figures are printed (run with -s to see them).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import pytest

from pgbatch.api import live
from tests.api.conftest import StartApi
from tests.api.support import SseEvent, count_rows, sse_events

WATCHERS = 50
SUBMITTERS = 50
# Each submitter's rounds: submit a batch, read it, list a page. 50 x 18 x 3 = 2,700
# requests: about ten seconds on a 2-core machine, where the clients, the server and its
# worker share one event loop (about 280 requests/s alongside the streams).
ROUNDS = 18
# A watched batch: shards of one item that sleep, so it progresses for a few seconds.
WATCHED_ITEMS = 4
WATCHED_SLEEP_S = 0.15
# Nothing here should take long; this only turns a hang into a failure.
DEADLINE_S = 120.0


@dataclass
class Tally:
    """What the clients saw."""

    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    events: int = 0
    ends_s: list[float] = field(default_factory=list)  # when each stream saw its end
    started: float = field(default_factory=time.monotonic)

    def record(self, response: httpx.Response, what: str) -> None:
        self.statuses[response.status_code] += 1
        if response.status_code >= 400:
            self.failures.append(f"{what}: {response.status_code} {response.text[:200]}")


async def watch(client: httpx.AsyncClient, batch_id: int, tally: Tally) -> list[SseEvent]:
    """Follow one batch's event stream to its end."""
    async with client.stream("GET", f"/v1/batches/{batch_id}/events") as response:
        tally.record(response, f"events of {batch_id}")
        seen = []
        async for event in sse_events(response):
            tally.events += 1
            seen.append(event)
    tally.ends_s.append(time.monotonic() - tally.started)
    return seen


async def submit_read_list(client: httpx.AsyncClient, n: int, tally: Tally) -> list[int]:
    """Submit, read back and list, ROUNDS times; return the ids submitted."""
    ids = []
    for r in range(ROUNDS):
        items = [{"submitter": n, "round": r, "i": i} for i in range(1 + (n + r) % 7)]
        created = await client.post(
            "/v1/batches",
            json={"task": "echo", "items": items},
            headers={"Idempotency-Key": f"load-{n}-{r}"},
        )
        tally.record(created, "submit")
        if created.status_code != 201:
            continue
        ids.append(created.json()["id"])
        tally.record(await client.get(f"/v1/batches/{ids[-1]}"), "read")
        tally.record(await client.get("/v1/batches", params={"limit": 5}), "list")
    return ids


# Alone under xdist: its figures are the API's, not the other worker's, and sharing the
# two cores it took 109 s of its 120 s deadline (51 s alone).
@pytest.mark.exclusive
@pytest.mark.asyncio
async def test_streams_and_submitters_under_load(
    start_api: StartApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hub re-reads watched batches when no notification came for a while, which would
    # deliver a lost event late instead of never: here NOTIFY alone must deliver them all.
    monkeypatch.setattr(live, "FALLBACK_POLL_S", 3600.0)
    tally = Tally()
    async with start_api(worker=True) as running, contextlib.AsyncExitStack() as stack:
        # One client (one connection) per watcher and per submitter, as separate programs
        # would be.
        clients = [
            await stack.enter_async_context(running.client(timeout=DEADLINE_S))
            for _ in range(WATCHERS + SUBMITTERS)
        ]
        watching, submitting = clients[:WATCHERS], clients[WATCHERS:]
        watched = []
        for n in range(WATCHERS):
            items = [{"sleep": WATCHED_SLEEP_S, "n": n}] * WATCHED_ITEMS
            created = await clients[0].post("/v1/batches", json={"task": "slow", "items": items})
            tally.record(created, "submit watched")
            watched.append(created.json()["id"])
        started = tally.started = time.monotonic()
        async with asyncio.timeout(DEADLINE_S):
            streams = [
                asyncio.create_task(watch(c, b, tally))
                for c, b in zip(watching, watched, strict=True)
            ]
            submitted = await asyncio.gather(
                *(submit_read_list(c, n, tally) for n, c in enumerate(submitting))
            )
            submit_s = time.monotonic() - started
            seen = await asyncio.gather(*streams)
        last_end_s = max(tally.ends_s)
        stored = await count_rows(running, "batches")
    requests = sum(tally.statuses.values())
    print(
        f"\nload: {requests} requests ({dict(sorted(tally.statuses.items()))}) by "
        f"{SUBMITTERS} submitters in {submit_s:.1f} s = {requests / submit_s:.0f} requests/s; "
        f"{WATCHERS} streams got {tally.events} events, every one its end, the last "
        f"{last_end_s:.1f} s in"
    )
    assert not tally.failures, tally.failures[:10]
    for batch_id, events in zip(watched, seen, strict=True):
        assert events, f"stream of batch {batch_id} got nothing"
        assert {e.data["id"] for e in events} == {batch_id}
        end = events[-1]
        assert end.event == "end", (batch_id, [e.event for e in events])
        assert end.data["is_final"] and end.data["items_ok"] == WATCHED_ITEMS
        keys = [e.key for e in events]
        assert keys == sorted(set(keys)), (batch_id, keys)
    assert sum(len(ids) for ids in submitted) == SUBMITTERS * ROUNDS
    assert stored == WATCHERS + SUBMITTERS * ROUNDS
