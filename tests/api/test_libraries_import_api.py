"""POST /v1/libraries/{id}/documents/import: NDJSON streamed as one batch, all or nothing;
and documents whose indexing batch was cancelled read as `cancelled`."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest

from tests.api.conftest import RunningApi, StartApi
from tests.api.test_libraries_api import needs_pgvector

__all__ = ["needs_pgvector"]

NDJSON = {"Content-Type": "application/x-ndjson"}


async def _library(client: httpx.AsyncClient, name: str) -> str:
    created = await client.post("/v1/libraries", json={"name": name, "embedder": "hash-16"})
    assert created.status_code == 201, created.text
    return f"/v1/libraries/{created.json()['id']}"


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_an_ndjson_import_is_one_batch_and_indexes_every_line(api: RunningApi) -> None:
    async with api.client() as client:
        base = await _library(client, "imported")
        body = b"".join(
            orjson.dumps({"text": f"document {n} about vacuum", "metadata": {"n": n}}) + b"\n"
            for n in range(50)
        )
        imported = await client.post(f"{base}/documents/import", content=body, headers=NDJSON)
        assert imported.status_code == 201, imported.text
        assert imported.json()["documents"] == 50
        batch_id = imported.json()["batch_id"]
        done = await api.app.wait(batch_id, timeout_s=60, callbacks=True)
        assert (done.total_items, done.items_ok) == (50, 50)
        assert (await client.get(base)).json()["documents"] == {"indexed": 50}
        octet = await client.post(
            f"{base}/documents/import",
            content=b'{"chunks": ["one", "two"]}\n',
            headers={"Content-Type": "application/octet-stream"},
        )
        assert octet.status_code == 201 and octet.json()["documents"] == 1, octet.text


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_bad_line_is_422_naming_it_and_nothing_is_written(api: RunningApi) -> None:
    async with api.client() as client:
        base = await _library(client, "refused")
        body = b'{"text": "fine"}\n\n{"text": "fine too"}\n{"text": 3}\n{"text": "never"}\n'
        refused = await client.post(f"{base}/documents/import", content=body, headers=NDJSON)
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["field"] == "body" and error["message"].startswith("line 4: "), error
        assert (await client.get(f"{base}/documents")).json()["documents"] == []
        batches = (await client.get("/v1/batches")).json()["batches"]
        assert not any(b["task"] == "pgbatch.vector_index" for b in batches)
        json_body = await client.post(f"{base}/documents/import", json={"text": "x"})
        assert json_body.status_code == 415, json_body.text
        missing = await client.post(
            "/v1/libraries/999999/documents/import", content=b'{"text": "x"}\n', headers=NDJSON
        )
        assert missing.status_code == 404, missing.text


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_a_cancelled_indexing_reads_cancelled(start_api: StartApi) -> None:
    async with start_api(worker=False) as api, api.client() as client:
        base = await _library(client, "stopped")
        posted = await client.post(f"{base}/documents", json={"text": "stopped early"})
        assert posted.status_code == 201, posted.text
        doc = posted.json()
        assert await api.app.cancel(doc["batch_id"])
        worker = api.app.worker(concurrency=1)  # runs the settling callback
        running = asyncio.create_task(worker.run())
        try:
            await api.app.wait(doc["batch_id"], timeout_s=30, callbacks=True)
        finally:
            worker.request_stop()
            await running
        read = (await client.get(f"{base}/documents/{doc['id']}")).json()
        assert (read["status"], read["error"]) == (
            "cancelled",
            f"indexing batch {doc['batch_id']} was cancelled",
        )
        listed = await client.get(f"{base}/documents", params={"status": "cancelled"})
        assert [d["id"] for d in listed.json()["documents"]] == [doc["id"]]
        assert (await client.get(base)).json()["documents"] == {"cancelled": 1}
