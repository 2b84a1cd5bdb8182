"""Attack on issue 12 §1 meeting §3: a cancelled batch's error groups hold its failures,
not its cancellations. Seen failing: a batch cancelled before it ran answered
GET /v1/batches/{id}/errors with `items_failed: 0` and one group "cancelled" of 3 items
(the dashboard's error groups and `pgbatch status`'s "most frequent errors" with it)."""

from __future__ import annotations

import pytest

from tests.api.conftest import StartApi


@pytest.mark.asyncio
async def test_cancelled_items_are_not_an_error_group(start_api: StartApi) -> None:
    async with start_api(worker=False) as running, running.client() as client:
        created = await client.post(
            "/v1/batches", json={"task": "echo", "items": [1, 2, 3], "shard_size": 2}
        )
        assert created.status_code == 201, created.text
        url = created.headers["location"]
        cancelled = await client.post(f"{url}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        final = await running.app.wait(created.json()["id"], timeout_s=30)
        assert (final.items_cancelled, final.items_failed) == (3, 0)
        groups = await client.get(f"{url}/errors")
        assert groups.status_code == 200, groups.text
        body = groups.json()
        assert (body["items_failed"], body["groups_total"], body["groups"]) == (0, 0, [])
