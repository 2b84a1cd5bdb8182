"""Chaos for LLM batches: a worker SIGKILLed while it holds a reservation of the shared limit."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

import pgbatch
from pgbatch.workloads import llm
from pgbatch.workloads.llm.fake_upstream import FakeLimits, FakeUpstream, serving
from pgbatch.workloads.llm.requests import check_request_lines
from pgbatch.workloads.llm.status import limit_states
from pgbatch.workloads.llm.usage import cache_key
from tests.helpers import WorkerGroup, fetch_all, poll

APP = "pgbatch.demo.llm_openai_app:app"
REQUESTS = 60
# Slow answers: a kill lands while the victim's reservation is out and unsettled.
LATENCY_MS = 400.0
MAX_IN_FLIGHT = 10


def _requests() -> list[bytes]:
    return [
        orjson.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"model": "m", "max_tokens": 4,
                               "messages": [{"role": "user", "content": f"q {i}"}]}})
        for i in range(REQUESTS)
    ]  # fmt: skip


@pytest.mark.asyncio
async def test_a_killed_workers_reservation_comes_back_and_every_request_has_one_line(
    app: pgbatch.App, database_url: str, tmp_path: Path
) -> None:
    fake = FakeUpstream(FakeLimits(latency_ms=LATENCY_MS))
    async with serving(fake) as base_url:
        env = {
            "PGBATCH_LLM_BASE_URL": base_url,
            "PGBATCH_LLM_RPM": "10000",
            "PGBATCH_LLM_MAX_IN_FLIGHT": str(MAX_IN_FLIGHT),
            "PGBATCH_RESCUE_INTERVAL_S": "0.2",
            "PGBATCH_POLL_INTERVAL_S": "0.2",
        }
        group = WorkerGroup(database_url, tmp_path, env=env)
        try:
            app.use(llm.WORKLOAD)
            requests = check_request_lines(_requests(), "/v1/chat/completions")
            batch = await llm.submit_requests(app, requests, shard_size=5, lease_ttl_s=2.0)
            # Each shard's items, read while all are queued: a shard done with no failed
            # item has no row at the end.
            ranges = await fetch_all(
                database_url,
                "SELECT id, first_seq, last_seq FROM pgbatch.shards WHERE batch_id = %s",
                (batch.id,),
            )
            workers = [group.start(name=f"w{i}", concurrency=4, args=["--app", APP])
                       for i in range(2)]  # fmt: skip
            # Wait until a worker holds a reservation that is out (unsettled, running).
            holder = await poll(lambda: _holder(database_url), timeout_s=60)
            victim = next(w for w in workers if f":{w.pid}:" in holder)
            victim.kill()
            [state] = await limit_states(app)
            assert state.in_flight > 0  # the dead worker's share still counts, for now
            done = await app.wait(batch.id, timeout_s=120)
            # Once its lease was taken over, the dead worker's share is in flight no more.
            [state] = await limit_states(app)
        finally:
            group.stop_all()
    assert (done.items_ok, done.items_failed) == (REQUESTS, 0), group.logs()
    lines = [line async for line in llm.output_lines(app, batch.id)]
    errors = [line async for line in llm.output_lines(app, batch.id, errors=True)]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"c{i}" for i in range(REQUESTS))
    assert errors == []
    assert state.in_flight == 0
    # Each request reached the fake at most once per run of its shard. A run reserves its
    # calls under its lease (one epoch per claim) before sending any.
    leases = dict(
        await fetch_all(
            database_url,
            "SELECT shard_id, count(DISTINCT lease_epoch)::int FROM pgbatch.llm_reservations"
            " GROUP BY 1",
        )
    )
    runs = {
        seq: leases.get(shard_id, 0)
        for shard_id, first_seq, last_seq in ranges
        for seq in range(first_seq, last_seq + 1)
    }
    for seq, raw in enumerate(_requests()):
        request = orjson.loads(raw)
        assert fake.calls[cache_key(request["url"], request["body"])] <= runs[seq]
    assert max(runs.values()) >= 2  # the kill did cost a rerun somewhere


async def _holder(database_url: str) -> str | None:
    rows = await fetch_all(
        database_url,
        "SELECT s.worker_id FROM pgbatch.llm_reservations r JOIN pgbatch.shards s"
        " ON s.id = r.shard_id AND s.lease_epoch = r.lease_epoch AND s.status = 'running'"
        " WHERE NOT r.settled LIMIT 1",
    )
    return rows[0][0] if rows else None
