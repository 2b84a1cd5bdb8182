"""Issue 12 §2-3 over HTTP: a batch's name and metadata (set at submit, shown, filtered per
tenant, refused with the field named when out of bounds), and honest progress for a
cancelled batch (cancelled apart from failed, not throughput, waiting apart from running)."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from pgbatch.labels import MAX_METADATA_KEYS, MAX_METADATA_VALUE_CHARS, MAX_NAME_CHARS
from tests.api.conftest import RunningApi, StartApi
from tests.api.support import STREAM_TIMEOUT_S, assert_error, assert_nothing_written
from tests.helpers import wait_until

HOSTILE_NAME = '<img src=x onerror="alert(1)">[/red][bold]x'
HOSTILE_METADATA = {"owner": "<script>alert('m')</script>", "note": "[/red] & </td>"}


async def _submit(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/batches", json={"task": "echo", "items": [1, 2], **body})
    assert response.status_code == 201, response.text
    document: dict[str, Any] = response.json()
    return document


async def _listed(client: httpx.AsyncClient, params: Any) -> list[int]:
    response = await client.get("/v1/batches", params=params)
    assert response.status_code == 200, response.text
    return [b["id"] for b in response.json()["batches"]]


@pytest.mark.asyncio
async def test_name_and_metadata_are_stored_shown_and_filtered(api: RunningApi) -> None:
    async with api.client() as client:
        nightly = await _submit(
            client, name="nightly", metadata={"project": "alpha", "owner": "ops"}
        )
        other = await _submit(client, name="nightly", metadata={"project": "beta"})
        hostile = await _submit(client, name=HOSTILE_NAME, metadata=HOSTILE_METADATA)
        plain = await _submit(client)
        # NDJSON submit: the labels are query parameters, metadata as repeated key:value.
        streamed = await client.post(
            "/v1/batches",
            params=[
                ("task", "echo"),
                ("name", "streamed"),
                ("metadata", "project:alpha"),
                ("metadata", "url:http://x:8080/a"),
            ],
            content=b"1\n2\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        assert streamed.status_code == 201, streamed.text
        ndjson = streamed.json()

        assert (nightly["name"], nightly["metadata"]) == (
            "nightly",
            {"project": "alpha", "owner": "ops"},
        )
        # Split at the first colon: a value may hold colons.
        assert ndjson["metadata"] == {"project": "alpha", "url": "http://x:8080/a"}
        # Stored and returned exactly: markup is data, not something the API interprets.
        shown = (await client.get(f"/v1/batches/{hostile['id']}")).json()
        assert (shown["name"], shown["metadata"]) == (HOSTILE_NAME, HOSTILE_METADATA)
        assert (plain["name"], plain["metadata"]) == (None, {})

        assert await _listed(client, {"name": "nightly"}) == [other["id"], nightly["id"]]
        assert await _listed(client, {"metadata": "project:alpha"}) == [
            ndjson["id"],
            nightly["id"],
        ]
        # Several pairs: every one must match (containment, other keys allowed).
        both = [("metadata", "project:alpha"), ("metadata", "owner:ops")]
        assert await _listed(client, both) == [nightly["id"]]
        assert await _listed(client, [("name", "nightly"), ("metadata", "project:beta")]) == [
            other["id"]
        ]
        assert await _listed(client, {"metadata": f"owner:{HOSTILE_METADATA['owner']}"}) == [
            hostile["id"]
        ]
        assert await _listed(client, {"name": HOSTILE_NAME}) == [hostile["id"]]
        # An empty value is a value: no batch has owner "".
        assert await _listed(client, {"metadata": "owner:"}) == []


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ({"metadata": {f"k{n}": "v" for n in range(MAX_METADATA_KEYS + 1)}}, "metadata"),
        ({"metadata": {"big": "x" * (MAX_METADATA_VALUE_CHARS + 1)}}, "metadata.big"),
        ({"metadata": {"a:b": "v"}}, "metadata.a:b"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"metadata": {"n": 1}}, "metadata.n"),
        ({"metadata": {"nul": "a\x00b"}}, "metadata.nul"),
        ({"metadata": ["not", "an", "object"]}, "metadata"),
        ({"name": "n" * (MAX_NAME_CHARS + 1)}, "name"),
        ({"name": "   "}, "name"),
        ({"name": "a\x00b"}, "name"),
    ],
)
@pytest.mark.asyncio
async def test_labels_out_of_bounds_are_refused_naming_the_field_and_write_nothing(
    api: RunningApi, labels: dict[str, Any], field: str
) -> None:
    async with api.client() as client:
        response = await client.post(
            "/v1/batches",
            content=orjson.dumps({"task": "echo", "items": [1], **labels}),
            headers={"Content-Type": "application/json"},
        )
        assert_error(response, 422, field=field)
        await assert_nothing_written(api)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ([("metadata", "no-colon")], "metadata"),
        ([("metadata", ":v")], "metadata"),
        ([("metadata", "k:1"), ("metadata", "k:2")], "metadata"),
        ([("metadata", f"k{n}:v") for n in range(MAX_METADATA_KEYS + 1)], "metadata"),
        ([("metadata", "big:" + "x" * (MAX_METADATA_VALUE_CHARS + 1))], "metadata"),
        ([("name", "n" * (MAX_NAME_CHARS + 1))], "name"),
    ],
)
@pytest.mark.asyncio
async def test_bad_label_filters_and_ndjson_labels_are_422_naming_the_field(
    api: RunningApi, params: list[tuple[str, str]], field: str
) -> None:
    async with api.client() as client:
        listed = await client.get("/v1/batches", params=params)
        error = assert_error(listed, 422)
        assert error["field"] is not None and error["field"].startswith(field), error
        submitted = await client.post(
            "/v1/batches",
            params=[("task", "echo"), *params],
            content=b"1\n",
            headers={"Content-Type": "application/x-ndjson"},
        )
        error = assert_error(submitted, 422)
        assert error["field"] is not None and error["field"].startswith(field), error
        await assert_nothing_written(api)


@pytest.mark.asyncio
async def test_the_label_filters_see_only_the_callers_batches(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme", "globex")) as api,
        api.client("acme") as acme,
        api.client("globex") as globex,
    ):
        mine = await _submit(acme, name="shared-name", metadata={"project": "x"})
        theirs = await _submit(globex, name="shared-name", metadata={"project": "x"})
        for client, own in ((acme, mine), (globex, theirs)):
            assert await _listed(client, {"name": "shared-name"}) == [own["id"]]
            assert await _listed(client, {"metadata": "project:x"}) == [own["id"]]
            assert await _listed(client, [("name", "shared-name"), ("metadata", "project:x")]) == [
                own["id"]
            ]
        # Nor by id: the other tenant's labelled batch is a 404.
        assert_error(await acme.get(f"/v1/batches/{theirs['id']}"), 404)


@pytest.mark.asyncio
async def test_a_cancelled_batch_counts_cancelled_apart_and_is_not_throughput(
    api: RunningApi,
) -> None:
    # 3 quick items, then 20 that sleep far longer than the test: cancelled mid-run, some
    # running (stopped at their next heartbeat, every lease_ttl_s / 3), the rest queued.
    items: list[Any] = [{"sleep": 0}] * 3 + [{"sleep": 60}] * 20
    async with api.client() as client:
        response = await client.post(
            "/v1/batches",
            json={"task": "slow", "items": items, "shard_size": 1, "lease_ttl_s": 1.5},
        )
        assert response.status_code == 201, response.text
        url = f"/v1/batches/{response.json()['id']}"

        async def three_ok() -> str | None:
            answer = await client.get(url)
            return answer.headers["etag"] if answer.json()["items_ok"] == 3 else None

        etag = await wait_until(three_ok, STREAM_TIMEOUT_S, message="the quick items never ran")
        cancelled = await client.patch(
            url, json={"status": "cancelled"}, headers={"If-Match": etag}
        )
        assert cancelled.status_code == 200, cancelled.text

        async def final() -> dict[str, Any] | None:
            batch: dict[str, Any] = (await client.get(url)).json()
            return batch if batch["is_final"] else None

        batch = await wait_until(final, STREAM_TIMEOUT_S, message="the cancel never ended")
        assert batch["status"] == "cancelled"
        assert (batch["items_ok"], batch["items_failed"], batch["items_cancelled"]) == (3, 0, 20)
        assert batch["items_done"] == 23
        # Waiting (submit to first claim) and running (first claim to end) apart.
        assert batch["waiting_s"] is not None and batch["waiting_s"] >= 0
        assert batch["running_s"] is not None and batch["running_s"] > 0
        insight = (await client.get(f"{url}/insight")).json()
        # The chart counts what ran, not what the cancel ended.
        assert sum(point["items"] for point in insight["throughput"]) == 3
        assert insight["shard_states"] == {"done": 3, "cancelled": 20}
        # Nor errors: what the cancel ended is not among the failures.
        assert insight["error_samples"] == []
        errors = (await client.get(f"{url}/errors")).json()
        assert (errors["items_failed"], errors["groups_total"], errors["groups"]) == (0, 0, [])
        # Each item still has its one result, which says so.
        results = (await client.get(f"{url}/results", params={"status": "error"})).text
        assert [orjson.loads(line)["error"] for line in results.splitlines()] == ["cancelled"] * 20


@pytest.mark.asyncio
async def test_a_pending_batch_has_no_waiting_or_running_time_yet(start_api: StartApi) -> None:
    async with start_api(worker=False) as api, api.client() as client:
        batch = await _submit(client, name="queued")
        assert (batch["waiting_s"], batch["running_s"]) == (None, None)
        assert batch["items_cancelled"] == 0


@pytest.mark.asyncio
async def test_patch_changes_the_labels_under_if_match(start_api: StartApi) -> None:
    async with start_api(worker=False) as api, api.client() as client:
        batch = await _submit(client, name="before", metadata={"a": "1"})
        url = f"/v1/batches/{batch['id']}"
        etag = (await client.get(url)).headers["etag"]
        # Without If-Match: 428; with a stale one: 412; nothing changes either way.
        assert_error(await client.patch(url, json={"name": "x"}), 428, field="If-Match")
        stale = await client.patch(url, json={"name": "x"}, headers={"If-Match": '"999"'})
        assert_error(stale, 412)
        renamed = await client.patch(
            url, json={"name": "after", "metadata": {"b": "2"}}, headers={"If-Match": etag}
        )
        assert renamed.status_code == 200, renamed.text
        body = renamed.json()
        assert (body["name"], body["metadata"]) == ("after", {"b": "2"})
        assert renamed.headers["etag"] != etag  # the version moved
        # Only what is given changes; a null name clears it.
        cleared = await client.patch(
            url, json={"name": None}, headers={"If-Match": renamed.headers["etag"]}
        )
        assert (cleared.json()["name"], cleared.json()["metadata"]) == (None, {"b": "2"})
        # Out of bounds: 422 naming the pair, and the labels stay.
        bad = await client.patch(
            url,
            json={"metadata": {"b": "x" * (MAX_METADATA_VALUE_CHARS + 1)}},
            headers={"If-Match": cleared.headers["etag"]},
        )
        assert_error(bad, 422, field="metadata.b")
        assert (await client.get(url)).json()["metadata"] == {"b": "2"}
        assert await _listed(client, {"metadata": "b:2"}) == [batch["id"]]
        assert await _listed(client, {"metadata": "a:1"}) == []


@pytest.mark.asyncio
async def test_patch_of_another_tenants_labels_is_404(start_api: StartApi) -> None:
    async with (
        start_api(tenants=("acme", "globex"), worker=False) as api,
        api.client("acme") as acme,
        api.client("globex") as globex,
    ):
        theirs = await _submit(globex, name="theirs")
        answer = await acme.patch(
            f"/v1/batches/{theirs['id']}", json={"name": "mine"}, headers={"If-Match": "*"}
        )
        assert_error(answer, 404)
        assert (await globex.get(f"/v1/batches/{theirs['id']}")).json()["name"] == "theirs"
