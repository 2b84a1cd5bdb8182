"""POST /v1/documents: one document per call through the group-commit writer."""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from pgbatch.workloads.documents import document_key
from tests.api.conftest import RunningApi, StartApi


def _doc(kind: str, ident: str, *refs: tuple[str, str]) -> dict[str, object]:
    return {
        "identity": {"type": kind, "id": ident},
        "body": {"name": f"{kind} {ident}"},
        "references": [{"type": k, "id": i} for k, i in refs],
    }


@pytest.mark.asyncio
async def test_concurrent_posts_that_reference_each_other_all_commit(start_api: StartApi) -> None:
    # A cycle of three and a chain, posted at the same moment: they can only all commit if
    # they meet in one flush (a reference outside the flush must already exist), so the
    # flush waits long enough for every request to arrive.
    docs = [
        _doc("node", "a", ("node", "b")),
        _doc("node", "b", ("node", "c")),
        _doc("node", "c", ("node", "a")),
        *[_doc("chain", str(n), ("chain", str(n + 1))) for n in range(20)],
        _doc("chain", "20"),
    ]
    async with start_api(writer_max_delay_ms=500) as api, api.client() as client:
        answers = await asyncio.gather(*(client.post("/v1/documents", json=d) for d in docs))
        assert [a.status_code for a in answers] == [201] * len(docs), [a.text for a in answers]
        await _check_stored(api, docs, answers)


async def _check_stored(
    api: RunningApi, docs: list[dict[str, object]], answers: list[httpx.Response]
) -> None:
    expected = {str(document_key(d["identity"])) for d in docs}  # type: ignore[arg-type]
    assert {a.json()["key"] for a in answers} == expected
    async with api.app.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pgbatch.documents")
        assert (await cur.fetchone()) == (len(docs),)
        cur = await conn.execute("SELECT count(*) FROM pgbatch.document_references")
        assert (await cur.fetchone()) == (3 + 20,)


@pytest.mark.asyncio
async def test_missing_reference_is_409_with_the_missing_keys(api: RunningApi) -> None:
    async with api.client() as client:
        answer = await client.post("/v1/documents", json=_doc("s", "1", ("school", "nowhere")))
        assert answer.status_code == 409, answer.text
        error = answer.json()["error"]
        assert error["code"] == "missing_references"
        assert error["field"] == "references"
        assert error["missing"] == [str(document_key({"type": "school", "id": "nowhere"}))]
        async with api.app.db.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM pgbatch.documents")
            assert (await cur.fetchone()) == (0,)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "body",
    [
        {"identity": {"id": "1"}, "body": {}},  # no type
        {"identity": {"type": "s", "id": True}, "body": {}},  # a boolean field
        {"identity": {"type": "s"}, "body": [1, 2]},  # body not an object
        {"identity": {"type": "s"}, "body": {}, "extra": 1},  # unknown member
        {"identity": {"type": "s"}},  # no body
    ],
)
async def test_malformed_document_is_422_and_writes_nothing(
    api: RunningApi, body: dict[str, object]
) -> None:
    async with api.client() as client:
        answer = await client.post("/v1/documents", json=body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["field"]


@pytest.mark.asyncio
async def test_repost_updates_the_body(api: RunningApi) -> None:
    async with api.client() as client:
        first = await client.post("/v1/documents", json=_doc("s", "1"))
        again = await client.post(
            "/v1/documents", json={"identity": {"type": "s", "id": "1"}, "body": {"v": 2}}
        )
    assert first.status_code == again.status_code == 201
    async with api.app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT body FROM pgbatch.documents WHERE key = %s", [uuid.UUID(first.json()["key"])]
        )
        assert (await cur.fetchone()) == ({"v": 2},)


@pytest.mark.asyncio
async def test_tenants_documents_do_not_collide(start_api: StartApi) -> None:
    async with start_api(tenants=("acme", "globex")) as api:
        async with api.client("acme") as acme, api.client("globex") as globex:
            a = await acme.post("/v1/documents", json=_doc("s", "1"))
            g = await globex.post("/v1/documents", json=_doc("s", "1"))
            # globex cannot reference acme's document, even knowing its identity.
            cross = await globex.post(
                "/v1/documents",
                json={
                    "identity": {"type": "s", "id": "2"},
                    "body": {},
                    "references": [{"type": "s", "id": "1", "tenant": "acme"}],
                },
            )
    assert a.status_code == g.status_code == 201
    assert a.json()["key"] != g.json()["key"]
    assert cross.status_code == 422


@pytest.mark.asyncio
async def test_metrics_show_both_committers_flush_sizes(api: RunningApi) -> None:
    async with api.client() as client:
        posted = await asyncio.gather(
            *(client.post("/v1/documents", json=_doc("m", str(n))) for n in range(10))
        )
        assert {p.status_code for p in posted} == {201}
        batch = await client.post("/v1/batches", json={"task": "echo", "items": [1, 2, 3]})
        await api.app.wait(batch.json()["id"], timeout_s=30)
        text = (await client.get("/metrics")).text
    counts = {
        line.split("{")[1].split("}")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pgbatch_flush_size_count{")
    }
    # 10 documents in at least one writer flush; the batch's shard in a completer flush.
    assert counts['committer="writer"'] >= 1, text
    assert counts['committer="completer"'] >= 1, text
    # The writer's own stats: as many flushes as its histogram counts, a latency, a queue.
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("pgbatch_writer_")
    }
    assert values["pgbatch_writer_flushes_total"] == counts['committer="writer"'], text
    assert values['pgbatch_writer_flush_seconds{quantile="0.99"}'] > 0, text
    assert values["pgbatch_writer_queue_depth"] == 0, text
    assert values["pgbatch_writer_retries_total"] == 0, text
    assert values['pgbatch_writer_writes_total{outcome="written"}'] == 10, text
