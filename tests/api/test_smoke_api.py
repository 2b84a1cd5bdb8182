"""The API answers, end to end: submit over HTTP, a worker runs it, results stream back."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from pgbatch.api import live
from tests.api.conftest import RunningApi, StartApi


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


@pytest.mark.asyncio
async def test_a_link_downloads_csv_and_the_token_is_not_logged(
    start_api: StartApi,
) -> None:
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    access_log = logging.getLogger("uvicorn.access")
    async with start_api(tenants=("acme",)) as api:
        async with api.client("acme") as client:
            created = await client.post("/v1/batches", json={"task": "echo", "items": ["a,b"]})
            batch_id = created.json()["id"]
            await api.app.wait(batch_id, timeout_s=30)
        token = api.tokens["acme"]
        # A plain link: no headers at all, the token and the format in the query.
        level = access_log.level
        # After the server started: uvicorn's logging set-up replaces the logger's handlers.
        access_log.addHandler(handler)
        access_log.setLevel(logging.INFO)  # the test server logs warnings only
        try:
            async with httpx.AsyncClient(base_url=api.base_url) as browser:
                answer = await browser.get(
                    f"/v1/batches/{batch_id}/results?format=csv&access_token={token}"
                )
        finally:
            access_log.removeHandler(handler)
            access_log.setLevel(level)
    assert answer.status_code == 200, answer.text
    assert answer.text.splitlines() == ["seq,ok,output,error", '0,true,"""a,b""",']
    assert any("access_token=***" in line for line in seen), seen
    assert not any(token in line for line in seen), seen


@pytest.mark.asyncio
async def test_a_priority_change_reaches_the_event_stream(
    start_api: StartApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No fallback poll: only the change's own NOTIFY can bring the new priority.
    monkeypatch.setattr(live, "FALLBACK_POLL_S", 3600.0)
    async with start_api() as api, api.client() as client:
        created = await client.post("/v1/batches", json={"task": "gated", "items": [1]})
        batch_id = created.json()["id"]
        priorities = []
        async with client.stream("GET", f"/v1/batches/{batch_id}/events") as stream:
            async for line in stream.aiter_lines():
                if not line.startswith("data: "):
                    continue
                priorities.append(json.loads(line[6:])["priority"])
                if priorities == [0]:
                    # Any version: the worker's first claim may have moved it meanwhile.
                    patched = await client.patch(
                        f"/v1/batches/{batch_id}", json={"priority": 5}, headers={"If-Match": "*"}
                    )
                    assert patched.status_code == 200, patched.text
                elif priorities[-1] == 5:
                    break
    assert priorities[-1] == 5, priorities
