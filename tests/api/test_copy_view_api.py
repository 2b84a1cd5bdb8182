"""The collection-copy job view's data (issue 12 §3): source → target, associations inserted /
already present / total, and the copy's labels, which the batch list filters on."""

from __future__ import annotations

import pytest

from pgbatch.workloads import collections as copies
from tests.api.conftest import RunningApi
from tests.api.test_collections_api import _seed


@pytest.mark.asyncio
async def test_a_copy_reports_its_endpoints_and_associations_out_of_the_total(
    api: RunningApi,
) -> None:
    await _seed(api, "src", 2_500, "dst")
    async with api.client() as client:
        reports = []
        for _ in range(2):
            started = await client.post(
                "/v1/collections/src/copy", json={"target": "dst", "item_ids": "all"}
            )
            assert started.status_code == 201, started.text
            batch = started.json()
            assert batch["name"] == "copy src → dst"
            assert batch["metadata"] == {
                "source": "src",
                "target": "dst",
                "associations_total": "2500",
            }
            await api.app.wait(batch["id"], timeout_s=30)
            reports.append((await client.get(f"/v1/collections/copies/{batch['id']}")).json())
        listed = await client.post(
            "/v1/collections/src/copy",
            json={"target": "dst", "item_ids": ["company-000000001", "not-there"]},
        )
        await api.app.wait(listed.json()["id"], timeout_s=30)
        of_list = (await client.get(f"/v1/collections/copies/{listed.json()['id']}")).json()
        # The copies are found by their endpoints, as any labelled batch.
        found = await client.get("/v1/batches", params={"metadata": "target:dst"})
    first, second = reports
    assert (first["source"], first["target"]) == ("src", "dst")
    # Counted in associations, not ranges: 2,500 keys in 3 ranges.
    assert (first["inserted"], first["already_present"], first["associations_total"]) == (
        2_500,
        0,
        2_500,
    )
    assert first["ranges_total"] == 3
    assert (second["inserted"], second["already_present"], second["associations_total"]) == (
        0,
        2_500,
        2_500,
    )
    assert (
        of_list["inserted"],
        of_list["already_present"],
        of_list["not_in_source"],
        of_list["associations_total"],
    ) == (0, 1, 1, 2)
    assert len(found.json()["batches"]) == 3


@pytest.mark.asyncio
async def test_a_copy_submitted_before_totals_were_recorded_reports_none(api: RunningApi) -> None:
    await _seed(api, "src", 10, "dst")
    batch = await copies.submit_copy(api.app, source="src", target="dst", item_ids=None)
    async with api.app.db.connection() as conn:
        # As a copy of the previous release is stored: no labels.
        await conn.execute(
            "UPDATE pgbatch.batches SET name = NULL, metadata = '{}' WHERE id = %s", (batch.id,)
        )
    await api.app.wait(batch.id, timeout_s=30)
    async with api.client() as client:
        report = (await client.get(f"/v1/collections/copies/{batch.id}")).json()
    assert (report["source"], report["target"], report["inserted"]) == ("src", "dst", 10)
    assert report["associations_total"] is None
