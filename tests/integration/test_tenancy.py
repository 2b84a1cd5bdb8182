"""Issue 9 items 4 and 9 in the library: collections are scoped by tenant (the copy's own
statement included), old tables upgrade in place, and JSON is stored exactly or refused."""

from __future__ import annotations

import pytest

import pgbatch
from pgbatch.workloads import collections as copies
from pgbatch.workloads.documents import document_item
from pgbatch.writer import InvalidDocumentError
from tests.helpers import register_noop
from tests.integration.test_collections import running


async def _keys(app: pgbatch.App, tenant: str, collection: str) -> set[str]:
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT item_id FROM pgbatch.collection_items WHERE tenant = %s AND collection_id = %s",
            (tenant, collection),
        )
        return {row[0] for row in await cur.fetchall()}


@pytest.mark.asyncio
async def test_a_hand_made_copy_batch_reads_and_writes_only_its_tenants_collections(
    app: pgbatch.App,
) -> None:
    # The library may submit the internal task directly; its statement still runs in the
    # batch's tenant: globex's "secret" reads as empty and globex's "inbox" gets nothing.
    copies.install(app)
    await copies.create_tables(app)
    await copies.create_collection(app, "secret", tenant="globex")
    await copies.seed_items(app, "secret", 50, tenant="globex")
    await copies.create_collection(app, "inbox", tenant="globex")
    await copies.create_collection(app, "dst", tenant="acme")
    await copies.create_collection(app, "mine", tenant="acme")
    await copies.seed_items(app, "mine", 5, tenant="acme")
    items = [
        {"source": "secret", "target": "dst", "first": "a", "last": "z"},
        {"source": "secret", "target": "dst", "ids": ["company-000000001"]},
    ]
    # acme's own source, into globex's "inbox" (a collection acme does not have).
    into_theirs = [{"source": "mine", "target": "inbox", "first": "a", "last": "z"}]
    async with running(app):
        for batch_items in (items[:1], items[1:], into_theirs):
            batch = await app.submit(copies.TASK, batch_items, tenant="acme")
            await app.wait(batch.id, timeout_s=30)
            report = await copies.copy_report(app, batch.id, tenant="acme")
            assert (report.inserted, report.already_present) == (0, 0), report
    assert await _keys(app, "acme", "dst") == set()
    assert await _keys(app, "globex", "inbox") == set()
    assert await _keys(app, "acme", "inbox") == set()  # no rows for a collection never made
    assert len(await _keys(app, "globex", "secret")) == 50


@pytest.mark.asyncio
async def test_collections_tables_of_the_previous_version_upgrade_in_place(
    app: pgbatch.App,
) -> None:
    # The tables as the previous release created them, with data.
    async with app.db.connection() as conn:
        await conn.execute(
            """
            CREATE TABLE collections (
                id text COLLATE "C" PRIMARY KEY, name text,
                created_at timestamptz NOT NULL DEFAULT now());
            CREATE TABLE collection_items (
                collection_id text COLLATE "C" NOT NULL, item_id text COLLATE "C" NOT NULL,
                PRIMARY KEY (collection_id, item_id));
            CREATE TABLE collection_copy_stats (
                batch_id bigint NOT NULL, shard_id bigint NOT NULL, inserted bigint NOT NULL,
                already_present bigint NOT NULL, not_in_source bigint NOT NULL,
                PRIMARY KEY (batch_id, shard_id));
            INSERT INTO collections (id) VALUES ('src'), ('dst');
            INSERT INTO collection_items VALUES ('src', 'a'), ('src', 'b'), ('dst', 'a');
            """
        )
    register_noop(app)
    copies.install(app)
    await copies.create_tables(app)
    await copies.create_tables(app)  # idempotent
    async with app.db.connection() as conn:
        cur = await conn.execute(
            "SELECT to_regclass('public.collections'), to_regclass('pgbatch.collections')"
        )
        assert await cur.fetchone() == (None, "pgbatch.collections"), "not moved to pgbatch"
    assert await _keys(app, "default", "src") == {"a", "b"}
    # The old rows are the default tenant's; another tenant may now use the same names.
    assert await copies.create_collection(app, "src", tenant="acme")
    assert not await copies.create_collection(app, "src")
    assert await copies.add_items(app, "src", ["a", "z"], tenant="acme") == 2
    async with running(app):
        batch = await copies.submit_copy(app, source="src", target="dst", item_ids=None)
        await app.wait(batch.id, timeout_s=30)
    report = await copies.copy_report(app, batch.id)
    assert (report.inserted, report.already_present) == (1, 1)
    assert await _keys(app, "default", "dst") == {"a", "b"}
    assert await _keys(app, "acme", "src") == {"a", "z"}


@pytest.mark.asyncio
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63) - 1])
async def test_app_submit_refuses_numbers_json_cannot_hold_exactly(
    app: pgbatch.App, value: float
) -> None:
    register_noop(app)
    with pytest.raises(pgbatch.InvalidBatchError) as raised:
        await app.submit("t", [1, {"x": [value]}])
    assert raised.value.field == "items.1.x.0", raised.value
    with pytest.raises(pgbatch.InvalidBatchError):
        await app.submit("t", ({"x": value} for _ in range(1_500)))  # the COPY path
    async with app.db.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM pgbatch.batches")
        assert (await cur.fetchone()) == (0,)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**64, -(2**63) - 1])
def test_a_document_refuses_numbers_json_cannot_hold_exactly(value: float) -> None:
    with pytest.raises(InvalidDocumentError, match=r"body\.x"):
        document_item({"type": "s", "id": "1"}, {"x": value})
    assert document_item({"type": "s", "id": "1"}, {"x": 2**64 - 1}).payload.body_json == (
        '{"x":18446744073709551615}'
    )
