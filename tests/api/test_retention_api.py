"""Retention through HTTP: retention_s at submit, 410 with pruned_at for a pruned batch."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.api.conftest import RunningApi, StartApi


async def _finished(client: httpx.AsyncClient, batch_id: int) -> dict[str, Any]:
    for _ in range(600):
        body: dict[str, Any] = (await client.get(f"/v1/batches/{batch_id}")).json()
        if body.get("is_final"):
            return body
        await asyncio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} did not finish")


@pytest.mark.asyncio
async def test_a_pruned_batch_answers_410_with_when_for_its_tenant_only(
    start_api: StartApi,
) -> None:
    async with start_api(tenants=("acme", "other")) as api:
        async with api.client("acme") as acme, api.client("other") as other:
            made = await acme.post(
                "/v1/batches", json={"task": "echo", "items": [1, 2, 3], "retention_s": 0}
            )
            assert made.status_code == 201, made.text
            batch_id = made.json()["id"]
            await _finished(acme, batch_id)
            report = await api.app.prune()
            assert report.pruned == [batch_id]
            for method, path in (
                ("GET", f"/v1/batches/{batch_id}"),
                ("GET", f"/v1/batches/{batch_id}/results"),
                ("GET", f"/v1/batches/{batch_id}/insight"),
                ("POST", f"/v1/batches/{batch_id}/retry"),
            ):
                answer = await acme.request(method, path, headers={"If-Match": "*"})
                assert answer.status_code == 410, (path, answer.text)
                error = answer.json()["error"]
                assert error["code"] == "batch_pruned" and error["pruned_at"], error
            scrape = (await api.client().get("/metrics")).text
            assert "pgbatch_batches_pruned 1.0" in scrape
            assert 'pgbatch_table_bytes{table="results"}' in scrape
            # Another tenant learns nothing: the id is simply not theirs.
            foreign = await other.get(f"/v1/batches/{batch_id}")
            assert foreign.status_code == 404
            assert foreign.json()["error"]["code"] == "batch_not_found"


@pytest.mark.asyncio
async def test_retention_s_is_checked_and_null_or_forever_keeps_a_batch(api: RunningApi) -> None:
    async with api.client() as client:
        for bad in (-1, "soon", 1e12, True):
            answer = await client.post(
                "/v1/batches", json={"task": "echo", "items": [1], "retention_s": bad}
            )
            assert answer.status_code == 422, (bad, answer.text)
            assert answer.json()["error"]["field"] == "retention_s"
        answer = await client.post(
            "/v1/batches?task=echo&retention_s=later",
            content=b"1\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert answer.status_code == 422 and answer.json()["error"]["field"] == "retention_s"
        kept_json = await client.post(
            "/v1/batches", json={"task": "echo", "items": [1], "retention_s": None}
        )
        kept_ndjson = await client.post(
            "/v1/batches?task=echo&retention_s=forever",
            content=b"1\n2\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        expiring = await client.post(
            "/v1/batches?task=echo&retention_s=0",
            content=b"1\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        ids = [r.json()["id"] for r in (kept_json, kept_ndjson, expiring)]
        for batch_id in ids:
            await _finished(client, batch_id)
        assert (await api.app.prune()).pruned == [ids[2]]
        for batch_id in ids[:2]:
            assert (await client.get(f"/v1/batches/{batch_id}")).status_code == 200


@pytest.mark.asyncio
async def test_a_results_download_cut_by_a_prune_is_an_error_not_a_short_file(
    api: RunningApi,
) -> None:
    items = 60_000
    async with api.client() as client:
        made = await client.post(
            "/v1/batches",
            json={
                "task": "echo",
                "items": list(range(items)),
                "retention_s": 0,
                "shard_size": 5000,
            },
        )
        batch_id = made.json()["id"]
        await _finished(client, batch_id)
        lines = 0
        outcome = "whole"
        try:
            async with client.stream("GET", f"/v1/batches/{batch_id}/results") as stream:
                assert stream.status_code == 200
                pruned = False
                async for line in stream.aiter_lines():
                    lines += bool(line)
                    if not pruned:
                        pruned = True
                        assert (await api.app.prune()).pruned == [batch_id]
        except httpx.HTTPError as exc:  # the server ended the stream without its last chunk
            outcome = type(exc).__name__
        # Either every line came (the server had read them all before the prune), or the
        # client saw an error: never a clean end after a partial download.
        assert outcome != "whole" or lines == items, (outcome, lines)
