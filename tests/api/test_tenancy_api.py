"""Issue 9 items 4, 9 and 12: one tenant can neither read, write nor probe another's
collections or documents; JSON is stored exactly or refused; documents can be read back."""

from __future__ import annotations

import orjson
import pytest

from pgbatch.workloads import collections as copies
from tests.api.conftest import RunningApi, StartApi
from tests.api.support import assert_error, assert_nothing_written

TENANTS = ("acme", "globex")


async def _keys(api: RunningApi, tenant: str, collection: str) -> set[str]:
    async with api.app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT item_id FROM pgbatch.collection_items WHERE tenant = %s AND collection_id = %s",
            (tenant, collection),
        )
        return {row[0] for row in await cur.fetchall()}


async def _seed_two_tenants(api: RunningApi) -> None:
    # globex's private "secret" (50 rows) and its "inbox"; acme's own "mine" and "dst".
    await copies.create_collection(api.app, "secret", tenant="globex")
    await copies.seed_items(api.app, "secret", 50, tenant="globex")
    await copies.create_collection(api.app, "inbox", tenant="globex")
    await copies.create_collection(api.app, "mine", tenant="acme")
    await copies.seed_items(api.app, "mine", 50, prefix="acme-", tenant="acme")
    await copies.create_collection(api.app, "dst", tenant="acme")


@pytest.mark.asyncio
async def test_a_tenant_cannot_copy_out_of_another_tenants_collection(
    start_api: StartApi,
) -> None:
    async with start_api(tenants=TENANTS) as api, api.client("acme") as acme:
        await _seed_two_tenants(api)
        for item_ids in ("all", ["company-000000001", "company-000000002"]):
            answer = await acme.post(
                "/v1/collections/secret/copy", json={"target": "dst", "item_ids": item_ids}
            )
            # The same answer as for a collection that does not exist at all.
            missing = await acme.post(
                "/v1/collections/nowhere/copy", json={"target": "dst", "item_ids": item_ids}
            )
            error = assert_error(answer, 404, code="collection_not_found", field="source")
            assert error["message"] == assert_error(missing, 404)["message"].replace(
                "nowhere", "secret"
            )
        assert await _keys(api, "acme", "dst") == set()
        await assert_nothing_written(api)


@pytest.mark.asyncio
async def test_a_tenant_cannot_copy_into_another_tenants_collection(start_api: StartApi) -> None:
    async with start_api(tenants=TENANTS) as api, api.client("acme") as acme:
        await _seed_two_tenants(api)
        answer = await acme.post(
            "/v1/collections/mine/copy", json={"target": "inbox", "item_ids": "all"}
        )
        missing = await acme.post(
            "/v1/collections/mine/copy", json={"target": "nowhere", "item_ids": "all"}
        )
        assert_error(answer, 422, code="invalid_batch", field="target")
        assert (
            assert_error(missing, 422)["message"].replace("nowhere", "inbox")
            == (answer.json()["error"]["message"])
        )
        assert await _keys(api, "globex", "inbox") == set()
        await assert_nothing_written(api)


@pytest.mark.asyncio
async def test_same_named_collections_of_two_tenants_are_separate(start_api: StartApi) -> None:
    # Both tenants have "src" and "dst": acme's copy reads and writes acme's only, and its
    # counts say nothing of globex's keys (no membership probe through not_in_source).
    async with start_api(tenants=TENANTS) as api, api.client("acme") as acme:
        for tenant, count in (("acme", 3), ("globex", 50)):
            await copies.create_collection(api.app, "src", tenant=tenant)
            await copies.seed_items(api.app, "src", count, tenant=tenant)
            await copies.create_collection(api.app, "dst", tenant=tenant)
        await copies.add_items(api.app, "dst", ["company-000000010"], tenant="globex")
        probe = ["company-000000001", "company-000000010", "company-000000040"]
        started = await acme.post(
            "/v1/collections/src/copy", json={"target": "dst", "item_ids": probe}
        )
        assert started.status_code == 201, started.text
        await api.app.wait(started.json()["id"], timeout_s=30)
        report = (await acme.get(f"/v1/collections/copies/{started.json()['id']}")).json()
        assert (report["inserted"], report["already_present"], report["not_in_source"]) == (1, 0, 2)
        assert await _keys(api, "acme", "dst") == {"company-000000001"}
        assert await _keys(api, "globex", "dst") == {"company-000000010"}
        assert len(await _keys(api, "globex", "src")) == 50


@pytest.mark.asyncio
@pytest.mark.parametrize("content_type", ["application/json", "application/x-ndjson"])
async def test_a_hand_made_copy_batch_is_refused_naming_the_task(
    start_api: StartApi, content_type: str
) -> None:
    item = {"source": "secret", "target": "inbox", "first": "a", "last": "z"}
    async with start_api(tenants=TENANTS) as api, api.client("acme") as acme:
        await _seed_two_tenants(api)
        if content_type == "application/json":
            answer = await acme.post("/v1/batches", json={"task": copies.TASK, "items": [item]})
        else:
            answer = await acme.post(
                "/v1/batches",
                params={"task": copies.TASK},
                content=b'{"source": "secret", "target": "inbox", "first": "a", "last": "z"}\n',
                headers={"Content-Type": content_type},
            )
        error = assert_error(answer, 422, code="internal_task", field="task")
        assert copies.TASK in error["message"]
        await assert_nothing_written(api)
        assert await _keys(api, "globex", "inbox") == set()


def _doc(ident: str, **identity: object) -> dict[str, object]:
    return {"identity": {"type": "s", "id": ident, **identity}, "body": {"who": ident}}


@pytest.mark.asyncio
async def test_a_tenant_named_default_cannot_alias_another_tenants_documents(
    start_api: StartApi,
) -> None:
    async with start_api(tenants=("acme", "default")) as api:
        async with api.client("acme") as acme, api.client("default") as default:
            mine = await acme.post("/v1/documents", json=_doc("1"))
            assert mine.status_code == 201, mine.text
            forged = await default.post("/v1/documents", json=_doc("1", tenant="acme"))
            assert_error(forged, 422, field="identity.tenant")
            ref = await default.post(
                "/v1/documents",
                json={**_doc("2"), "references": [{"type": "s", "id": "1", "tenant": "acme"}]},
            )
            assert_error(ref, 422, field="references.0.tenant")
            read = await acme.get(mine.headers["Location"])
        assert read.status_code == 200, read.text
        assert read.json()["body"] == {"who": "1"}


@pytest.mark.asyncio
async def test_get_document_reads_the_callers_own_and_404s_another_tenants(
    start_api: StartApi,
) -> None:
    async with start_api(tenants=TENANTS) as api:
        async with api.client("acme") as acme, api.client("globex") as globex:
            posted = await acme.post("/v1/documents", json=_doc("7"))
            assert posted.status_code == 201, posted.text
            location = posted.headers["Location"]
            mine = await acme.get(location)
            theirs = await globex.get(location)
            unknown = await acme.get("/v1/documents/00000000-0000-5000-8000-000000000000")
            malformed = await acme.get("/v1/documents/not-a-key")
    assert mine.status_code == 200, mine.text
    assert mine.json() == {
        "key": posted.json()["key"],
        "identity": {"type": "s", "id": "7", "tenant": "acme"},
        "body": {"who": "7"},
        "references": [],
    }
    error = assert_error(theirs, 404, code="document_not_found")
    assert error == assert_error(unknown, 404, code="document_not_found") | {
        "message": error["message"]
    }
    assert malformed.status_code in (404, 422), malformed.text


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("POST", "/v1/documents", b'{"identity": {"type": "s", "id": "1"}, "body": {}}'),
        ("POST", "/v1/collections/src/copy", b'{"target": "dst", "item_ids": "all"}'),
        ("PATCH", "/v1/batches/1", b'{"priority": 3}'),
    ],
)
async def test_a_json_route_answers_415_to_another_content_type(
    api: RunningApi, method: str, url: str, body: bytes
) -> None:
    async with api.client(headers={"If-Match": '"1"'}) as client:
        answer = await client.request(
            method, url, content=body, headers={"Content-Type": "text/plain"}
        )
    assert_error(answer, 415, code="unsupported_media_type", field="Content-Type")
    async with api.app.db.connection() as conn:
        cur = await conn.execute("SELECT to_regclass('documents') IS NOT NULL")
        row = await cur.fetchone()
        if row is not None and row[0]:
            cur = await conn.execute("SELECT count(*) FROM pgbatch.documents")
            assert (await cur.fetchone()) == (0,)


HUGE = "123456789012345678901234567890"


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("literal", "field"),
    [
        ("NaN", "body"),
        ("Infinity", "body"),
        ("-Infinity", "body"),
        ("1e400", "body"),
        (HUGE, "body.x"),
        ("-9223372036854775809", "body.x"),
        (f"[1, {HUGE}]", "body.x.1"),
    ],
)
async def test_a_document_with_a_number_json_cannot_hold_exactly_is_422(
    api: RunningApi, literal: str, field: str
) -> None:
    raw = '{"identity": {"type": "s", "id": "1"}, "body": {"x": LITERAL}}'.replace(
        "LITERAL", literal
    )
    async with api.client() as client:
        answer = await client.post(
            "/v1/documents", content=raw, headers={"Content-Type": "application/json"}
        )
    error = assert_error(answer, 422)
    assert error["field"] == field, error
    async with api.app.db.connection() as conn:
        cur = await conn.execute("SELECT to_regclass('documents') IS NOT NULL")
        row = await cur.fetchone()
        if row is not None and row[0]:
            cur = await conn.execute("SELECT count(*) FROM pgbatch.documents")
            assert (await cur.fetchone()) == (0,)


@pytest.mark.asyncio
@pytest.mark.parametrize("ndjson", [False, True])
async def test_a_batch_item_with_an_integer_beyond_64_bits_is_422_naming_it(
    api: RunningApi, ndjson: bool
) -> None:
    async with api.client() as client:
        if ndjson:
            answer = await client.post(
                "/v1/batches",
                params={"task": "echo"},
                content=f'1\n{{"n": {HUGE}}}\n'.encode(),
                headers={"Content-Type": "application/x-ndjson"},
            )
        else:
            answer = await client.post(
                "/v1/batches",
                content=f'{{"task": "echo", "items": [1, {{"n": {HUGE}}}]}}'.encode(),
                headers={"Content-Type": "application/json"},
            )
    error = assert_error(answer, 422)
    assert error["field"] == "items.1.n", error
    await assert_nothing_written(api)


@pytest.mark.asyncio
async def test_the_largest_64_bit_integers_are_kept_exactly(api: RunningApi) -> None:
    values = [2**63 - 1, -(2**63), 2**64 - 1]
    async with api.client() as client:
        batch = await client.post(
            "/v1/batches",
            content=b'{"task": "echo", "items": [%s]}' % ", ".join(map(str, values)).encode(),
            headers={"Content-Type": "application/json"},
        )
        assert batch.status_code == 201, batch.text
        await api.app.wait(batch.json()["id"], timeout_s=30)
        results = await client.get(f"/v1/batches/{batch.json()['id']}/results")
        doc = await client.post(
            "/v1/documents",
            content=b'{"identity": {"type": "n", "id": "1"}, "body": {"n": 18446744073709551615}}',
            headers={"Content-Type": "application/json"},
        )
        assert doc.status_code == 201, doc.text
        read = await client.get(doc.headers["Location"])
    assert [orjson.loads(line)["output"] for line in results.text.splitlines()] == values
    assert read.json()["body"] == {"n": 2**64 - 1}


@pytest.mark.asyncio
async def test_without_a_token_a_non_json_body_is_401_before_415(start_api: StartApi) -> None:
    async with start_api(tenants=TENANTS) as api, api.client() as anonymous:
        answer = await anonymous.post(
            "/v1/documents", content=b"{}", headers={"Content-Type": "text/plain"}
        )
    assert_error(answer, 401, field="Authorization")


@pytest.mark.asyncio
async def test_error_groups_are_the_tenants_own(start_api: StartApi) -> None:
    from tests.helpers import wait_until

    async with (
        start_api(tenants=TENANTS) as api,
        api.client("acme") as acme,
        api.client("globex") as globex,
    ):
        items = ["ok", "fail", {"n": 1}, "fail", "ok", "fail"] + ["ok"] * 4 + ["raise"]
        created = await acme.post("/v1/batches", json={"task": "flaky", "items": items})
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]

        async def finished() -> bool:
            return bool((await acme.get(f"/v1/batches/{batch_id}")).json()["is_final"])

        await wait_until(finished, 30)
        grouped = await acme.get(f"/v1/batches/{batch_id}/errors", params={"samples": 2})
        assert grouped.status_code == 200, grouped.text
        body = grouped.json()
        # "fail" three times (items 1, 3, 5); the shard of "raise" (items 10) dead after
        # its attempts: two groups, the largest first, each with its first items' input.
        assert body["batch_id"] == batch_id and body["groups_total"] == 2
        first = body["groups"][0]
        assert (first["error"], first["items"], first["first_seq"]) == ("asked to fail", 3, 1)
        assert first["samples"] == [
            {"seq": 1, "input": "fail", "traceback": None},
            {"seq": 3, "input": "fail", "traceback": None},
        ]
        second = body["groups"][1]
        assert second["items"] == 1 and [(s["seq"], s["input"]) for s in second["samples"]] == [
            (10, "raise")
        ]
        assert "RuntimeError: the shard asked to fail" in second["samples"][0]["traceback"]
        assert sum(g["items"] for g in body["groups"]) == body["items_failed"] == 4
        assert_error(await globex.get(f"/v1/batches/{batch_id}/errors"), 404)
        bad = await acme.get(f"/v1/batches/{batch_id}/errors", params={"limit": 0})
        assert_error(bad, 422, field="limit")
