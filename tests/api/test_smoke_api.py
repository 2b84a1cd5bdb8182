"""The API answers, end to end: submit over HTTP, a worker runs it, results stream back."""

from __future__ import annotations

import pytest

from tests.api.conftest import RunningApi


@pytest.mark.asyncio
async def test_submit_run_and_read_results(api: RunningApi) -> None:
    async with api.client() as client:
        created = await client.post("/v1/batches", json={"task": "echo", "items": [1, 2, 3]})
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]
        final = await api.app.wait(batch_id, timeout_s=30)
        assert final.items_ok == 3
        results = await client.get(f"/v1/batches/{batch_id}/results")
        assert [line for line in results.text.splitlines() if line] == [
            '{"seq":0,"ok":true,"output":1,"error":null}',
            '{"seq":1,"ok":true,"output":2,"error":null}',
            '{"seq":2,"ok":true,"output":3,"error":null}',
        ]
