"""Attack on issue 12 §3 in Prometheus: a cancelled batch's items are counted apart, as
`pgbatch_items_finished{outcome="cancelled"}`, and are not throughput. Seen failing: the
gauge had only ok and failed, so a cancellation did not show at all."""

from __future__ import annotations

import pytest

from tests.api.conftest import StartApi
from tests.api.test_system_api import _samples


@pytest.mark.asyncio
async def test_cancelled_items_are_a_gauge_of_their_own_and_not_throughput(
    start_api: StartApi,
) -> None:
    async with start_api(worker=False) as running, running.client() as client:
        created = await client.post(
            "/v1/batches", json={"task": "echo", "items": list(range(7)), "shard_size": 2}
        )
        assert created.status_code == 201, created.text
        await client.get("/metrics")  # the baseline scrape of items_per_second
        cancelled = await client.post(f"{created.headers['location']}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        final = await running.app.wait(created.json()["id"], timeout_s=30)
        assert (final.status, final.items_cancelled) == ("cancelled", 7)
        after = _samples((await client.get("/metrics")).text)
        finished = "pgbatch_items_finished"
        assert after[(finished, (("outcome", "cancelled"),))] == 7
        assert after[(finished, (("outcome", "failed"),))] == 0
        assert after[("pgbatch_items_per_second", ())] == 0
