"""POST /v1/collections/{source}/copy and GET /v1/collections/copies/{id} over HTTP."""

from __future__ import annotations

import pytest

from pgbatch.workloads import collections as copies
from tests.api.conftest import RunningApi, StartApi


async def _seed(
    api: RunningApi, source: str, count: int, *targets: str, tenant: str = "default"
) -> None:
    await copies.create_collection(api.app, source, tenant=tenant)
    await copies.seed_items(api.app, source, count, tenant=tenant)
    for target in targets:
        await copies.create_collection(api.app, target, tenant=tenant)


@pytest.mark.asyncio
async def test_copy_all_twice_inserts_once(api: RunningApi) -> None:
    await _seed(api, "src", 2_500, "dst")
    async with api.client() as client:
        reports = []
        for _ in range(2):
            started = await client.post(
                "/v1/collections/src/copy", json={"target": "dst", "item_ids": "all"}
            )
            assert started.status_code == 201, started.text
            batch = started.json()
            assert started.headers["Location"] == f"/v1/batches/{batch['id']}"
            final = await api.app.wait(batch["id"], timeout_s=30)
            assert final.items_done == final.total_items == 3  # ranges of 1,000 keys
            report = await client.get(f"/v1/collections/copies/{batch['id']}")
            assert report.status_code == 200, report.text
            reports.append(report.json())
    first, second = reports
    assert (first["inserted"], first["already_present"], first["finished"]) == (2_500, 0, True)
    assert (second["inserted"], second["already_present"]) == (0, 2_500)
    async with api.app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pgbatch.collection_items WHERE collection_id = 'dst'"
        )
        assert (await cur.fetchone()) == (2_500,)


@pytest.mark.asyncio
async def test_copy_a_list(api: RunningApi) -> None:
    await _seed(api, "src", 10, "dst")
    wanted = ["company-000000003", "company-000000001", "not-there"]
    async with api.client() as client:
        listed = await client.get("/v1/batches")
        started = await client.post(
            "/v1/collections/src/copy", json={"target": "dst", "item_ids": wanted}
        )
        assert started.status_code == 201, started.text
        await api.app.wait(started.json()["id"], timeout_s=30)
        report = (await client.get(f"/v1/collections/copies/{started.json()['id']}")).json()
    assert listed.status_code == 200
    assert (report["inserted"], report["not_in_source"]) == (2, 1), report


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("source", "body", "field"),
    [
        ("nowhere", {"target": "dst", "item_ids": "all"}, "source"),
        ("src", {"target": "nowhere", "item_ids": "all"}, "target"),
        ("src", {"target": "src", "item_ids": "all"}, "target"),
        ("src", {"target": "dst", "item_ids": []}, "item_ids"),
        ("src", {"target": "dst", "item_ids": "some"}, "item_ids"),
        ("src", {"target": "dst"}, "item_ids"),
    ],
)
async def test_bad_copy_is_422_naming_the_field_and_starts_nothing(
    api: RunningApi, source: str, body: dict[str, object], field: str
) -> None:
    await _seed(api, "src", 10, "dst")
    async with api.client() as client:
        answer = await client.post(f"/v1/collections/{source}/copy", json=body)
        # A source that does not exist is the path's resource: 404 (tests/api/test_tenancy_api).
        assert answer.status_code == (404 if source == "nowhere" else 422), answer.text
        assert answer.json()["error"]["field"].split(".")[0] == field, answer.text
        assert (await client.get("/v1/batches")).json()["batches"] == []


@pytest.mark.asyncio
async def test_a_copy_is_its_tenants_only(start_api: StartApi) -> None:
    async with start_api(tenants=("acme", "globex")) as api:
        await _seed(api, "src", 10, "dst", tenant="acme")
        async with api.client("acme") as acme, api.client("globex") as globex:
            started = await acme.post(
                "/v1/collections/src/copy", json={"target": "dst", "item_ids": "all"}
            )
            batch_id = started.json()["id"]
            assert (await acme.get(f"/v1/collections/copies/{batch_id}")).status_code == 200
            assert (await globex.get(f"/v1/collections/copies/{batch_id}")).status_code == 404
            assert (await globex.get("/v1/collections/copies/99999999")).status_code == 404


@pytest.mark.asyncio
async def test_the_same_idempotency_key_names_the_same_copy(api: RunningApi) -> None:
    await _seed(api, "src", 10, "dst", "other")
    async with api.client(headers={"Idempotency-Key": "copy-1"}) as client:
        body = {"target": "dst", "item_ids": "all"}
        first = await client.post("/v1/collections/src/copy", json=body)
        again = await client.post("/v1/collections/src/copy", json=body)
        changed = await client.post(
            "/v1/collections/src/copy", json={"target": "other", "item_ids": "all"}
        )
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert changed.status_code == 409, changed.text
