"""GET /v1/workers, GET /v1/queues, pause and resume, waiting_reason and the fleet gauges
in /metrics (issue 12 §2), on a real server and database, with and without tokens."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.api.conftest import StartApi
from tests.api.support import assert_error
from tests.helpers import wait_until

BEAT = {"worker_beat_s": 0.1, "worker_ttl_s": 2.0}


async def _submit(client: httpx.AsyncClient, task: str, n: int, **options: Any) -> dict[str, Any]:
    response = await client.post(
        "/v1/batches", json={"task": task, "items": list(range(n)), **options}
    )
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _live_workers(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    response = await client.get("/v1/workers")
    assert response.status_code == 200, response.text
    return [w for w in response.json()["workers"] if not w["expired"]]


@pytest.mark.asyncio
async def test_workers_show_slots_and_only_the_callers_batches(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme", "globex"), **BEAT) as api,
        api.client("acme") as acme,
        api.client("globex") as globex,
    ):
        batch = await _submit(acme, "gated", 3)

        async def three_in_use() -> list[dict[str, Any]]:
            workers = await _live_workers(acme)
            return workers if workers and workers[0]["slots_in_use"] == 3 else []

        [worker] = await wait_until(three_in_use, 20)
        assert worker["concurrency"] == 8 and "gated" in worker["tasks"]
        assert worker["queues"] == ["default"] and worker["pid"] > 0 and worker["version"]
        assert worker["running"] == [{"batch_id": batch["id"], "shards": 3}]
        body = (await acme.get("/v1/workers")).json()
        assert (body["live"], body["slots"], body["slots_in_use"]) == (1, 8, 3)
        # globex sees the shared worker and its slots, never acme's batch id.
        [seen] = await _live_workers(globex)
        assert seen["id"] == worker["id"] and seen["slots_in_use"] == 3
        assert seen["running"] == []
        api.gate.set()


@pytest.mark.asyncio
async def test_queues_count_the_callers_shards_and_pause_is_for_admins(
    start_api: StartApi,
) -> None:
    async with (
        start_api(
            tenants=("acme", "globex", "ops"), worker=False, admin_tenants="ops", **BEAT
        ) as api,
        api.client("acme") as acme,
        api.client("globex") as globex,
        api.client("ops") as ops,
    ):
        mine = await _submit(acme, "echo", 30, queue="bulk", shard_size=10)
        await _submit(globex, "echo", 5, queue="bulk", shard_size=1)
        queues = (await acme.get("/v1/queues")).json()["queues"]
        assert [(q["name"], q["queued_shards"], q["paused"]) for q in queues] == [
            ("bulk", 3, False)
        ]
        assert (await globex.get("/v1/queues")).json()["queues"][0]["queued_shards"] == 5
        # No worker at all: the batch says so instead of just "waiting".
        got = (await acme.get(f"/v1/batches/{mine['id']}")).json()
        assert got["waiting_reason"] == "no_live_worker"

        # A tenant's token may not stop everyone's queue; nothing changes.
        assert_error(await acme.post("/v1/queues/bulk/pause"), 403, code="forbidden")
        assert not (await acme.get("/v1/queues")).json()["queues"][0]["paused"]
        assert_error(await ops.post("/v1/queues/" + "x" * 201 + "/pause"), 422, field="name")

        paused = await ops.post("/v1/queues/bulk/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["paused"] is True and paused.json()["paused_at"]
        # ops has no shards there: its view counts its own (none).
        assert paused.json()["queued_shards"] == 0
        assert (await acme.get("/v1/queues")).json()["queues"][0]["paused"] is True
        listed = (await acme.get("/v1/batches")).json()["batches"]
        assert [b["waiting_reason"] for b in listed] == ["queue_paused"]
        assert_error(await globex.post("/v1/queues/bulk/resume"), 403, code="forbidden")
        resumed = await ops.post("/v1/queues/bulk/resume")
        assert resumed.status_code == 200 and resumed.json()["paused"] is False
        again = await ops.post("/v1/queues/bulk/resume")
        assert again.status_code == 200 and again.json()["paused"] is False


@pytest.mark.asyncio
async def test_without_tokens_the_operator_pauses_and_a_served_batch_has_no_reason(
    start_api: StartApi,
) -> None:
    async with start_api(**BEAT) as api, api.client() as client:
        await wait_until(lambda: _live_workers(client), 20)
        batch = await _submit(client, "gated", 1)
        assert (await client.get(f"/v1/batches/{batch['id']}")).json()["waiting_reason"] is None
        assert (await client.post("/v1/queues/default/pause")).status_code == 200
        got = (await client.get(f"/v1/batches/{batch['id']}")).json()
        assert got["waiting_reason"] == "queue_paused"
        assert (await client.post("/v1/queues/default/resume")).status_code == 200
        api.gate.set()


def _samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.mark.asyncio
async def test_metrics_expose_queue_depth_oldest_wait_pause_and_workers(
    start_api: StartApi,
) -> None:
    async with start_api(**BEAT) as api, api.client() as client:
        await wait_until(lambda: _live_workers(client), 20)
        await _submit(client, "echo", 4, queue="idle", shard_size=1)
        async with api.app.db.connection() as conn:
            await conn.execute(
                "UPDATE pgbatch.shards SET run_after = now() - interval '10 minutes'"
                " WHERE queue = 'idle'"
            )
        await client.post("/v1/queues/idle/pause")
        samples = _samples((await client.get("/metrics")).text)
        assert samples['pgbatch_queue_depth{queue="idle"}'] == 4
        assert samples['pgbatch_queue_oldest_queued_seconds{queue="idle"}'] >= 600
        assert samples['pgbatch_queue_paused{queue="idle"}'] == 1
        assert samples['pgbatch_queue_paused{queue="default"}'] == 0
        assert samples['pgbatch_workers{state="live"}'] == 1
        assert samples['pgbatch_worker_slots{state="total"}'] == 8
        await client.post("/v1/queues/idle/resume")
        samples = _samples((await client.get("/metrics")).text)
        assert samples['pgbatch_queue_paused{queue="idle"}'] == 0
