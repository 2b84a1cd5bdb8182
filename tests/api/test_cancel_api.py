"""POST /v1/batches/{id}/cancel: beside the PATCH, If-Match optional, tenant-scoped."""

from __future__ import annotations

import pytest

from tests.api.conftest import RunningApi, StartApi
from tests.api.support import assert_error, running_etag

TENANTS = ("acme", "globex")


@pytest.mark.asyncio
async def test_post_cancel_without_if_match_cancels_then_409s(api: RunningApi) -> None:
    async with api.client() as client:
        created = await client.post(
            "/v1/batches", json={"task": "gated", "items": [1, 2, 3], "shard_size": 1}
        )
        assert created.status_code == 201, created.text
        url = created.headers["location"]
        await running_etag(client, url)
        cancelled = await client.post(f"{url}/cancel")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.headers["etag"] == f'"{cancelled.json()["version"]}"'
        final = await api.app.wait(created.json()["id"], timeout_s=30)
        assert final.status == "cancelled"
        again = await client.post(f"{url}/cancel")
        assert_error(again, 409, code="invalid_state")
        missing = await client.post("/v1/batches/987654321/cancel")
        assert_error(missing, 404)


@pytest.mark.asyncio
async def test_post_cancel_with_a_stale_if_match_is_412_and_changes_nothing(
    api: RunningApi,
) -> None:
    async with api.client() as client:
        created = await client.post("/v1/batches", json={"task": "gated", "items": [1]})
        url = created.headers["location"]
        etag = await running_etag(client, url)
        changed = await client.patch(url, json={"priority": 5}, headers={"If-Match": etag})
        assert changed.status_code == 200, changed.text
        stale = await client.post(f"{url}/cancel", headers={"If-Match": etag})
        assert_error(stale, 412, code="stale_version")
        assert (await client.get(url)).json()["status"] == "running"
        fresh = await client.post(f"{url}/cancel", headers={"If-Match": changed.headers["etag"]})
        assert fresh.status_code == 200, fresh.text
        assert fresh.json()["status"] == "cancelled"


@pytest.mark.asyncio
async def test_post_cancel_of_another_tenants_batch_is_404(start_api: StartApi) -> None:
    async with start_api(tenants=TENANTS) as api, api.client("acme") as acme:
        async with api.client("globex") as globex:
            created = await globex.post("/v1/batches", json={"task": "gated", "items": [1]})
            assert created.status_code == 201, created.text
            url = created.headers["location"]
            answer = await acme.post(f"{url}/cancel")
            assert_error(answer, 404)
            assert (await globex.get(url)).json()["status"] in ("pending", "running")
