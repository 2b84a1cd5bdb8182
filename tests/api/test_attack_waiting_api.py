"""Attack on issue 12 §2: the batch a submission answers with says why it waits, as a GET
of it would. Seen failing: submitted into a paused queue, the 201 said
`"waiting_reason": null` while GET /v1/batches/{id} said "queue_paused"."""

from __future__ import annotations

import pytest

from tests.api.conftest import StartApi


@pytest.mark.asyncio
async def test_the_submit_answer_says_why_the_batch_waits(start_api: StartApi) -> None:
    async with start_api(worker=False) as running, running.client() as client:
        paused = await client.post("/v1/queues/default/pause")
        assert paused.status_code == 200, paused.text
        for body in ({"task": "echo", "items": [1, 2]}, {"task": "echo", "items": [3]}):
            created = await client.post("/v1/batches", json=body)
            assert created.status_code == 201, created.text
            read = await client.get(created.headers["location"])
            assert created.json()["waiting_reason"] == "queue_paused"
            assert read.json()["waiting_reason"] == "queue_paused"
        again = await client.post(
            "/v1/batches",
            json={"task": "echo", "items": [3]},
            headers={"Idempotency-Key": "k1"},
        )
        found = await client.post(
            "/v1/batches",
            json={"task": "echo", "items": [3]},
            headers={"Idempotency-Key": "k1"},
        )
        assert (again.status_code, found.status_code) == (201, 200)
        assert found.json()["waiting_reason"] == "queue_paused"
