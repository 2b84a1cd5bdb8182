"""Batches over real HTTP: submit (JSON, NDJSON, idempotency, limits, bad input), list,
read, update, retry and results."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from tests.api.conftest import RunningApi, StartApi
from tests.api.support import assert_error, assert_nothing_written, count_rows, running_etag

NDJSON = {"Content-Type": "application/x-ndjson"}


def ndjson(items: list[Any]) -> bytes:
    """Encode items one per line."""
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


async def in_chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    """Send `body` in pieces of `size` bytes, so lines straddle chunk boundaries."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


# -- submit ------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_json_submit_answers_201_with_location_and_etag(api: RunningApi) -> None:
    async with api.client() as client:
        created = await client.post(
            "/v1/batches",
            json={"task": "echo", "items": ["a", "b", "c"], "shard_size": 2, "priority": 7},
        )
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["task"] == "echo"
        assert body["total_items"] == 3
        assert body["total_shards"] == 2
        assert body["priority"] == 7
        assert created.headers["location"] == f"/v1/batches/{body['id']}"
        assert created.headers["etag"] == f'"{body["version"]}"'
        final = await api.app.wait(body["id"], timeout_s=30)
        assert final.items_ok == 3
        read = await client.get(created.headers["location"])
        assert read.status_code == 200
        assert read.headers["etag"] == f'"{read.json()["version"]}"'
        assert read.json()["status"] == "succeeded"
        assert read.json()["is_final"] is True


@pytest.mark.asyncio
async def test_ndjson_submit_streams_items_with_options_in_the_query(api: RunningApi) -> None:
    items: list[Any] = [{"n": n, "text": f"ligne {n} ✓"} for n in range(2_500)]
    items += ["", None, 0, [1, [2]], "back\\slash", "tab\there"]
    body = ndjson(items)
    # Blank lines are skipped; the last line has no newline; chunks split lines anywhere.
    body = body.replace(b"\n", b"\n\n", 3).rstrip(b"\n")
    async with api.client() as client:
        created = await client.post(
            "/v1/batches",
            params={
                "task": "echo",
                "shard_size": 500,
                "priority": -3,
                "max_attempts": 4,
                "lease_ttl_s": "2.5e1",
            },
            content=in_chunks(body, 997),
            headers=NDJSON,
        )
        assert created.status_code == 201, created.text
        batch = created.json()
        assert (batch["total_items"], batch["total_shards"]) == (len(items), 6)
        assert (batch["priority"], batch["max_attempts"], batch["shard_size"]) == (-3, 4, 500)
        assert batch["lease_ttl_s"] == 25.0
        await api.app.wait(batch["id"], timeout_s=30)
        results = await client.get(f"/v1/batches/{batch['id']}/results")
    lines = [orjson.loads(line) for line in results.text.splitlines()]
    assert [line["seq"] for line in lines] == list(range(len(items)))
    assert [line["output"] for line in lines] == items


@pytest.mark.asyncio
async def test_idempotency_key_returns_the_same_batch_or_409(api: RunningApi) -> None:
    payload = {"task": "echo", "items": [1, 2, 3]}
    async with api.client() as client:
        first = await client.post("/v1/batches", json=payload, headers={"Idempotency-Key": "k-1"})
        assert first.status_code == 201, first.text
        again = await client.post("/v1/batches", json=payload, headers={"Idempotency-Key": "k-1"})
        assert again.status_code == 200, again.text
        assert again.json()["id"] == first.json()["id"]
        assert again.headers["location"] == first.headers["location"]
        # The same items streamed as NDJSON are the same payload.
        streamed = await client.post(
            "/v1/batches",
            params={"task": "echo"},
            content=ndjson([1, 2, 3]),
            headers={**NDJSON, "Idempotency-Key": "k-1"},
        )
        assert streamed.status_code == 200, streamed.text
        assert streamed.json()["id"] == first.json()["id"]
        for different in (
            {"task": "echo", "items": [1, 2, 4]},
            {"task": "echo", "items": [1, 2, 3], "priority": 1},
            {"task": "flaky", "items": [1, 2, 3]},
        ):
            conflict = await client.post(
                "/v1/batches", json=different, headers={"Idempotency-Key": "k-1"}
            )
            assert_error(conflict, 409, code="idempotency_conflict", field="Idempotency-Key")
        other_key = await client.post(
            "/v1/batches", json=payload, headers={"Idempotency-Key": "k-2"}
        )
        assert other_key.status_code == 201
    assert await count_rows(api, "batches") == 2


@pytest.mark.asyncio
async def test_size_limits_answer_413_naming_the_limit(start_api: StartApi) -> None:
    async with (
        start_api(api_max_json_bytes=2048, api_max_items=5, api_max_item_bytes=64) as running,
        running.client() as client,
    ):
        big = await client.post("/v1/batches", json={"task": "echo", "items": ["x" * 3000]})
        assert "2048" in assert_error(big, 413, field="body")["message"]
        # Without a Content-Length the body is counted as it arrives.
        chunked = await client.post(
            "/v1/batches",
            content=in_chunks(orjson.dumps({"task": "echo", "items": ["x" * 3000]}), 100),
            headers={"Content-Type": "application/json"},
        )
        assert "2048" in assert_error(chunked, 413, field="body")["message"]
        many = await client.post("/v1/batches", json={"task": "echo", "items": list(range(6))})
        assert "5" in assert_error(many, 413, field="items")["message"]
        many_lines = await client.post(
            "/v1/batches", params={"task": "echo"}, content=ndjson(list(range(6))), headers=NDJSON
        )
        assert "5" in assert_error(many_lines, 413, field="items")["message"]
        long_line = await client.post(
            "/v1/batches",
            params={"task": "echo"},
            content=ndjson([1, "y" * 100, 2]),
            headers=NDJSON,
        )
        assert "64" in assert_error(long_line, 413, field="items")["message"]
        # A line that never ends is refused once it passes the limit, not spooled whole.
        endless = await client.post(
            "/v1/batches",
            params={"task": "echo"},
            content=in_chunks(b'"' + b"z" * 10_000, 10),
            headers=NDJSON,
        )
        assert "64" in assert_error(endless, 413, field="items")["message"]
        await assert_nothing_written(running)
        at_limits = await client.post(
            "/v1/batches", params={"task": "echo"}, content=ndjson(list(range(5))), headers=NDJSON
        )
        assert at_limits.status_code == 201, at_limits.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "content_type", ["text/plain", "multipart/form-data; boundary=x", "application/xml", "x"]
)
async def test_unsupported_content_type_answers_415(api: RunningApi, content_type: str) -> None:
    async with api.client() as client:
        response = await client.post(
            "/v1/batches",
            content=b'{"task": "echo", "items": [1]}',
            headers={"Content-Type": content_type},
        )
    assert_error(response, 415, code="unsupported_media_type", field="Content-Type")
    await assert_nothing_written(api)


BAD_JSON_SUBMISSIONS: list[tuple[Any, str]] = [
    ({"items": [1]}, "task"),
    ({"task": "echo"}, "items"),
    ({"task": "nope", "items": [1]}, "task"),
    ({"task": "", "items": [1]}, "task"),
    ({"task": 5, "items": [1]}, "task"),
    ({"task": "echo", "items": "abc"}, "items"),
    ({"task": "echo", "items": {"a": 1}}, "items"),
    ({"task": "echo", "items": None}, "items"),
    ({"task": "echo", "items": [1], "shard_size": 0}, "shard_size"),
    ({"task": "echo", "items": [1], "shard_size": "ten"}, "shard_size"),
    ({"task": "echo", "items": [1], "shard_size": 1.5}, "shard_size"),
    ({"task": "echo", "items": [1], "max_attempts": 0}, "max_attempts"),
    ({"task": "echo", "items": [1], "lease_ttl_s": -1}, "lease_ttl_s"),
    # The library's bounds (pgbatch.limits), so HTTP and App.submit refuse the same.
    ({"task": "echo", "items": [1], "lease_ttl_s": 1e-6}, "lease_ttl_s"),
    ({"task": "echo", "items": [1], "lease_ttl_s": 86_401}, "lease_ttl_s"),
    ({"task": "echo", "items": [1], "max_attempts": 1001}, "max_attempts"),
    ({"task": "echo", "items": [1], "priority": 2**31}, "priority"),
    ({"task": "echo", "items": [1], "priority": "high"}, "priority"),
    ({"task": "echo", "items": [1], "priority": True}, "priority"),
    ({"task": "echo", "items": [1], "shard_size": "10"}, "shard_size"),
    ({"task": "echo", "items": [1], "max_attempts": 2.0}, "max_attempts"),
    ({"task": "echo", "items": [1], "lease_ttl_s": "5"}, "lease_ttl_s"),
    ({"task": "echo", "items": [1], "queue": 7}, "queue"),
    ({"task": "echo", "items": [1], "queue": "a\u0000b"}, "queue"),
    ({"task": "echo", "items": [1], "queue": ""}, "queue"),
    ({"task": "echo", "items": [1], "on_complete": "nope"}, "on_complete"),
    ({"task": "echo", "items": [1], "colour": "red"}, "colour"),
]


@pytest.mark.asyncio
async def test_bad_json_submissions_answer_422_naming_the_field_and_write_nothing(
    api: RunningApi,
) -> None:
    async with api.client() as client:
        for payload, field in BAD_JSON_SUBMISSIONS:
            response = await client.post("/v1/batches", json=payload)
            assert_error(response, 422, field=field)
        for raw in (b"", b"{", b"[1, 2]", b"null", b'"text"', b"\xff\xfe", b'{"task": "echo",}'):
            response = await client.post(
                "/v1/batches", content=raw, headers={"Content-Type": "application/json"}
            )
            assert_error(response, 422, field="body")
        # Numbers JSON cannot hold are refused, not stored as null.
        for number in (b"1e400", b"-1e400", b"NaN", b"Infinity"):
            response = await client.post(
                "/v1/batches",
                content=b'{"task": "echo", "items": [1, %s]}' % number,
                headers={"Content-Type": "application/json"},
            )
            assert_error(response, 422, field="body")
        # Task and options belong in the body of a JSON submission.
        misplaced = await client.post(
            "/v1/batches", params={"shard_size": 3}, json={"task": "echo", "items": [1]}
        )
        assert_error(misplaced, 422, field="shard_size")
    await assert_nothing_written(api)


@pytest.mark.asyncio
async def test_bad_ndjson_submissions_answer_422_and_write_nothing(api: RunningApi) -> None:
    async with api.client() as client:
        no_task = await client.post("/v1/batches", content=ndjson([1]), headers=NDJSON)
        assert_error(no_task, 422, field="task")
        unknown = await client.post(
            "/v1/batches", params={"task": "nope"}, content=ndjson([1]), headers=NDJSON
        )
        assert_error(unknown, 422, field="task")
        for option, value in (("shard_size", 0), ("max_attempts", "x"), ("priority", 2**40)):
            bad = await client.post(
                "/v1/batches",
                params={"task": "echo", option: value},
                content=ndjson([1]),
                headers=NDJSON,
            )
            assert_error(bad, 422, field=option)
        # One bad line after thousands of good ones (already sent to COPY) undoes it all.
        good = ndjson([{"n": n} for n in range(5_000)])
        bad_line = await client.post(
            "/v1/batches",
            params={"task": "echo"},
            content=in_chunks(good + b'{"n": oops}\n' + ndjson([1, 2]), 4096),
            headers=NDJSON,
        )
        error = assert_error(bad_line, 422, field="items")
        assert "line 5001" in error["message"], error
    await assert_nothing_written(api)


# -- list and read --------------------------------------------------------------------------


async def _submit(client: Any, task: str, items: list[Any], **options: Any) -> dict[str, Any]:
    response = await client.post("/v1/batches", json={"task": task, "items": items, **options})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def _list_all(client: Any, limit: int, **filters: Any) -> list[int]:
    """Walk every page of a listing; check the pages are well-formed."""
    ids: list[int] = []
    cursor = None
    for _ in range(1000):
        params = {**filters, "limit": limit, **({"cursor": cursor} if cursor else {})}
        page = await client.get("/v1/batches", params=params)
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["batches"]) <= limit
        ids += [b["id"] for b in body["batches"]]
        cursor = body["next_cursor"]
        if cursor is None:
            return ids
    raise AssertionError("the cursor never ran out")


@pytest.mark.asyncio
async def test_list_filters_by_status_task_and_creation_time(api: RunningApi) -> None:
    async with api.client() as client:
        echo = [await _submit(client, "echo", [n]) for n in range(3)]
        failed = await _submit(client, "flaky", ["raise"])
        running = await _submit(client, "gated", [1])
        for batch in [*echo, failed]:
            await api.app.wait(batch["id"], timeout_s=30)

        async def ids(**filters: Any) -> set[int]:
            response = await client.get("/v1/batches", params=filters)
            assert response.status_code == 200, response.text
            return {b["id"] for b in response.json()["batches"]}

        assert await ids() == {b["id"] for b in [*echo, failed, running]}
        assert await ids(status="succeeded") == {b["id"] for b in echo}
        assert await ids(status="failed") == {failed["id"]}
        assert await ids(status="cancelled") == set()
        assert await ids(task="flaky") == {failed["id"]}
        assert await ids(task="echo", status="failed") == set()
        assert await ids(task="missing") == set()
        middle = echo[1]["created_at"]
        assert await ids(created_after=middle) == {b["id"] for b in [*echo[1:], failed, running]}
        assert await ids(created_before=middle) == {echo[0]["id"]}
        assert await ids(created_after=middle, created_before=failed["created_at"]) == {
            echo[1]["id"],
            echo[2]["id"],
        }
        bad = await client.get("/v1/batches", params={"status": "finished"})
        assert_error(bad, 422, field="status")
        # Date-times as RFC 3339 with their offset, as documented; nothing pydantic guesses.
        assert await ids(created_after="2000-01-01T02:00:00+02:00") == await ids()
        assert await ids(created_before="2000-01-01 00:00:00.5z") == set()
        for bad in ("yesterday", "0.5", "1700000000", "2024-05-01", "2024-05-01T12:00:00"):
            for name in ("created_after", "created_before"):
                response = await client.get("/v1/batches", params={name: bad})
                assert_error(response, 422, field=name)


@pytest.mark.asyncio
async def test_cursor_pagination_walks_every_batch_once(start_api: StartApi) -> None:
    async with start_api(worker=False) as running, running.client() as client:
        submitted = [
            (await _submit(client, "echo" if n % 3 else "flaky", [n]))["id"] for n in range(23)
        ]
        newest_first = sorted(submitted, reverse=True)
        for limit in (1, 5, 7, 23, 50):
            assert await _list_all(client, limit) == newest_first, limit
        flaky = [i for n, i in enumerate(submitted) if n % 3 == 0]
        assert await _list_all(client, 3, task="flaky") == sorted(flaky, reverse=True)
        # A page that ends exactly at the last batch may offer a cursor; it leads to nothing.
        last = await client.get("/v1/batches", params={"cursor": str(min(submitted))})
        assert last.json() == {"batches": [], "next_cursor": None}
        for cursor in ("abc", "-1", "1" * 30, ""):
            bad = await client.get("/v1/batches", params={"cursor": cursor})
            if cursor == "":
                assert bad.status_code in (200, 422), bad.text
            else:
                assert_error(bad, 422, field="cursor")
        for limit in (0, 501, "x"):
            assert_error(
                await client.get("/v1/batches", params={"limit": limit}), 422, field="limit"
            )


@pytest.mark.asyncio
async def test_get_batch_has_its_version_as_etag_and_404s_otherwise(api: RunningApi) -> None:
    async with api.client() as client:
        batch = await _submit(client, "gated", [1])
        read = await client.get(f"/v1/batches/{batch['id']}")
        assert read.status_code == 200
        assert read.headers["etag"] == f'"{read.json()["version"]}"'
        for missing in (batch["id"] + 1, 0, -1, 2**63, 10**30):
            assert_error(await client.get(f"/v1/batches/{missing}"), 404, code="batch_not_found")
        assert_error(await client.get("/v1/batches/abc"), 422, field="batch_id")


# -- update ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_patch_needs_a_current_if_match(api: RunningApi) -> None:
    async with api.client() as client:
        batch = await _submit(client, "gated", [1, 2])
        url = f"/v1/batches/{batch['id']}"
        missing = await client.patch(url, json={"priority": 5})
        assert_error(missing, 428, code="precondition_required", field="If-Match")
        etag = await running_etag(client, url)
        changed = await client.patch(url, json={"priority": 5}, headers={"If-Match": etag})
        assert changed.status_code == 200, changed.text
        assert changed.json()["priority"] == 5
        assert changed.headers["etag"] != etag
        assert changed.headers["etag"] == f'"{changed.json()["version"]}"'
        stale = await client.patch(url, json={"priority": 6}, headers={"If-Match": etag})
        assert_error(stale, 412, code="stale_version", field="If-Match")
        assert stale.headers["etag"] == changed.headers["etag"]
        for garbage in ("nonsense", '"abc"', "W/", '"-1"'):
            response = await client.patch(url, json={"priority": 6}, headers={"If-Match": garbage})
            assert_error(response, 412, field="If-Match")
        assert (await client.get(url)).json()["priority"] == 5
        unknown = await client.patch(
            f"/v1/batches/{batch['id'] + 100}", json={"priority": 1}, headers={"If-Match": etag}
        )
        assert_error(unknown, 404, code="batch_not_found")
        for body, field in (
            ({}, "body"),
            ({"status": "running"}, "status"),
            ({"priority": "high"}, "priority"),
            ({"priority": True}, "priority"),
            ({"priority": "5"}, "priority"),
            ({"priority": 2**31}, "priority"),
            ({"colour": "red"}, "colour"),
        ):
            bad = await client.patch(url, json=body, headers={"If-Match": "*"})
            assert_error(bad, 422, field=field)
        weak = await client.patch(
            url, json={"priority": 9}, headers={"If-Match": "W/" + changed.headers["etag"]}
        )
        assert weak.status_code == 200, weak.text


@pytest.mark.asyncio
async def test_patch_cancels_a_running_batch_then_409s(api: RunningApi) -> None:
    async with api.client() as client:
        batch = await _submit(client, "gated", [1, 2, 3], shard_size=1)
        url = f"/v1/batches/{batch['id']}"
        etag = await running_etag(client, url)
        cancelled = await client.patch(
            url, json={"status": "cancelled"}, headers={"If-Match": etag}
        )
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        final = await api.app.wait(batch["id"], timeout_s=30)
        assert final.status == "cancelled"
        etag = (await client.get(url)).headers["etag"]
        again = await client.patch(url, json={"status": "cancelled"}, headers={"If-Match": etag})
        assert_error(again, 409, code="invalid_state")
        retry = await client.post(f"{url}/retry")
        assert_error(retry, 409, code="invalid_state")


# -- retry ----------------------------------------------------------------------------------


async def _shards(running: RunningApi, batch_id: int) -> list[tuple[int, str, Any]]:
    """Return (shard_no, status, finished_at) of the batch's shards."""
    async with running.app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT shard_no, status, finished_at FROM pgbatch.shards"
            " WHERE batch_id = %s ORDER BY shard_no",
            (batch_id,),
        )
        return [(n, status, finished) for n, status, finished in await cur.fetchall()]


async def _block_finished_at(running: RunningApi, batch_id: int, first_seq: int) -> Any:
    """Return when the result block at `first_seq` was written (its shard's end)."""
    async with running.app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT finished_at FROM pgbatch.result_blocks WHERE batch_id = %s AND first_seq = %s",
            (batch_id, first_seq),
        )
        row = await cur.fetchone()
    assert row is not None and row[0] is not None
    return row[0]


@pytest.mark.asyncio
async def test_retry_requeues_failed_and_dead_shards(api: RunningApi) -> None:
    # Shard 0 has an item error, shard 1 raises (dead after 2 attempts), shard 2 is clean.
    items = ["ok", "fail", "raise", "ok", "ok", "ok"]
    async with api.client() as client:
        batch = await _submit(client, "flaky", items, shard_size=2)
        url = f"/v1/batches/{batch['id']}"
        first = await api.app.wait(batch["id"], timeout_s=30)
        assert (first.status, first.shards_dead, first.items_failed) == ("failed", 1, 3)
        before = await _shards(api, batch["id"])
        # The clean shard's completion deleted it; its result block says when it ended.
        assert [(n, s) for n, s, _ in before] == [(0, "done"), (1, "dead")]
        clean_at = await _block_finished_at(api, batch["id"], 4)
        etag = (await client.get(url)).headers["etag"]
        assert_error(await client.post(f"{url}/retry", headers={"If-Match": '"0"'}), 412)
        retried = await client.post(f"{url}/retry", headers={"If-Match": etag})
        assert retried.status_code == 200, retried.text
        body = retried.json()
        assert body["requeued_shards"] == 2
        assert body["batch"]["run_no"] == first.run_no + 1
        assert body["batch"]["is_final"] is False
        assert retried.headers["etag"] == f'"{body["batch"]["version"]}"'
        second = await api.app.wait(batch["id"], timeout_s=30)
        # The task fails the same way again: the shards ran again and the batch ended again.
        assert second.run_no == first.run_no + 1
        assert second.is_final
        assert (second.status, second.shards_dead, second.items_failed) == ("failed", 1, 3)
        after = await _shards(api, batch["id"])
        assert [(n, s) for n, s, _ in after] == [(0, "done"), (1, "dead")]
        # The two failed shards ran again (finished later); the clean one was left alone:
        # not resurrected, its block untouched.
        assert after[0][2] > before[0][2] and after[1][2] > before[1][2]
        assert await _block_finished_at(api, batch["id"], 4) == clean_at
        assert_error(await client.post(f"/v1/batches/{batch['id'] + 9}/retry"), 404)
        clean = await _submit(client, "echo", [1])
        await api.app.wait(clean["id"], timeout_s=30)
        nothing = await client.post(f"/v1/batches/{clean['id']}/retry")
        assert nothing.status_code == 200, nothing.text
        assert nothing.json()["requeued_shards"] == 0


# -- results --------------------------------------------------------------------------------

TRICKY_ITEMS: list[Any] = [
    "plain",
    "a,b,c",
    'say "hi"',
    "line1\nline2\r\nline3",
    "ünïcödé ✓ 🎉 中文",
    None,
    "",
    "fail",
    {"k": [1, "x,y", None], "q": '"'},
    12.5,
    True,
    "fail",
    "  padded  ",
]


async def _tricky_batch(running: RunningApi, client: Any) -> int:
    batch = await _submit(client, "flaky", TRICKY_ITEMS, shard_size=3)
    final = await running.app.wait(batch["id"], timeout_s=30)
    assert final.items_failed == 2
    return int(batch["id"])


def _expected(status: str = "all") -> list[dict[str, Any]]:
    # A failed line carries its traceback (null here: the handler returned the error).
    rows = [
        {"seq": seq, "ok": False, "output": None, "error": "asked to fail", "traceback": None}
        if item == "fail"
        else {"seq": seq, "ok": True, "output": item, "error": None}
        for seq, item in enumerate(TRICKY_ITEMS)
    ]
    return [r for r in rows if status == "all" or r["ok"] == (status == "ok")]


@pytest.mark.asyncio
async def test_results_stream_as_ndjson(api: RunningApi) -> None:
    async with api.client() as client:
        batch_id = await _tricky_batch(api, client)
        for status in ("all", "ok", "error"):
            response = await client.get(
                f"/v1/batches/{batch_id}/results", params={"status": status}
            )
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            assert response.text.endswith("\n")
            lines = [orjson.loads(line) for line in response.text.split("\n")[:-1]]
            assert lines == _expected(status), status
        assert_error(
            await client.get(f"/v1/batches/{batch_id}/results", params={"status": "bad"}),
            422,
            field="status",
        )
        assert_error(await client.get(f"/v1/batches/{batch_id + 1}/results"), 404)


@pytest.mark.asyncio
async def test_results_stream_as_csv(api: RunningApi) -> None:
    async with api.client() as client:
        batch_id = await _tricky_batch(api, client)
        for status in ("all", "ok", "error"):
            response = await client.get(
                f"/v1/batches/{batch_id}/results",
                params={"status": status},
                headers={"Accept": "text/csv"},
            )
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/csv")
            assert f"batch-{batch_id}.csv" in response.headers["content-disposition"]
            rows = list(csv.reader(io.StringIO(response.content.decode("utf-8"), newline="")))
            assert rows[0] == ["seq", "ok", "output", "error"]
            parsed = [
                {"seq": int(seq), "ok": ok == "true",
                 "output": orjson.loads(output) if output else None, "error": error or None}
                for seq, ok, output, error in rows[1:]
            ]  # fmt: skip
            # CSV has no traceback column.
            expected = [{k: v for k, v in r.items() if k != "traceback"} for r in _expected(status)]
            assert parsed == expected, status
        # A null output and an empty-string output stay apart: the output column is JSON.
        response = await client.get(
            f"/v1/batches/{batch_id}/results", headers={"Accept": "text/csv"}
        )
        by_seq = {row[0]: row for row in csv.reader(io.StringIO(response.text, newline=""))}
        assert by_seq["5"][2] == "" and by_seq["6"][2] == '""'


@pytest.mark.asyncio
async def test_results_of_a_large_batch_come_in_order_in_both_formats(api: RunningApi) -> None:
    # More rows than one page of the results query (10,000) and than one chunk of either format.
    n = 10_050
    async with api.client() as client:
        created = await client.post(
            "/v1/batches",
            params={"task": "echo", "shard_size": 1_000},
            content=ndjson([f"item,{i}" for i in range(n)]),
            headers=NDJSON,
        )
        batch_id = created.json()["id"]
        await api.app.wait(batch_id, timeout_s=60)
        as_ndjson = await client.get(f"/v1/batches/{batch_id}/results")
        lines = as_ndjson.text.splitlines()
        assert len(lines) == n
        assert [orjson.loads(line)["output"] for line in lines] == [f"item,{i}" for i in range(n)]
        as_csv = await client.get(f"/v1/batches/{batch_id}/results", headers={"Accept": "text/csv"})
        rows = list(csv.reader(io.StringIO(as_csv.text, newline="")))[1:]
        assert [int(r[0]) for r in rows] == list(range(n))
        assert [orjson.loads(r[2]) for r in rows] == [f"item,{i}" for i in range(n)]


@pytest.mark.asyncio
async def test_a_shard_over_max_shard_bytes_answers_413_naming_the_limit(
    start_api: StartApi,
) -> None:
    # Issue 9: 1,100 lines of 1 MiB in one shard were accepted, and no claim could read it.
    # The same check at a small bound: shards of 10 items of ~500 bytes are over 4 KiB.
    limit = 4096
    items = [{"pad": "x" * 500, "n": n} for n in range(30)]
    async with start_api(max_shard_bytes=limit, worker=False) as api:
        async with api.client() as client:
            streamed = await client.post(
                "/v1/batches",
                params={"task": "echo", "shard_size": 10},
                content=in_chunks(ndjson(items), 1000),
                headers=NDJSON,
            )
            inline = await client.post(
                "/v1/batches", json={"task": "echo", "items": items, "shard_size": 10}
            )
            for response in (streamed, inline):
                error = assert_error(response, 413, code="shard_too_large", field="items")
                assert str(limit) in error["message"], error
                assert "shard_size" in error["message"], error
            await assert_nothing_written(api)
            fits = await client.post(
                "/v1/batches", json={"task": "echo", "items": items, "shard_size": 5}
            )
            assert fits.status_code == 201, fits.text
