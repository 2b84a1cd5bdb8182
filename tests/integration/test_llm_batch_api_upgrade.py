"""A database of the previous release (pgbatch and its shipped workloads, no llm tables)
takes the llm workload's migrations (0001 the limits and usage, 0002 the OpenAI Batch
API's files and batches) in place: its batches stay and the new tables work."""

from __future__ import annotations

import io
from collections.abc import Sequence

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import applied_versions, migrate, pending_migrations
from pgbatch.workloads import collections, documents, llm
from pgbatch.workloads.llm.batch_api import service
from tests.conftest import settings_for


async def _echo(items: Sequence[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
    return [pgbatch.ok(item.value) for item in items]


PREVIOUS = [w.component for w in (collections.WORKLOAD, documents.WORKLOAD) if w.component]


@pytest.mark.asyncio
async def test_a_previous_release_database_takes_the_llm_migration_in_place(
    empty_database: str,
) -> None:
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        await migrate(conn, components=PREVIOUS)
    before = pgbatch.App(settings=settings_for(empty_database))
    before.task("echo")(_echo)
    async with before:
        old = await before.submit("echo", ["a", "b"], tenant="acme")
    component = llm.WORKLOAD.component
    assert component is not None
    async with await psycopg.AsyncConnection.connect(empty_database, autocommit=True) as conn:
        assert await pending_migrations(conn, [component]) == {"llm": [1, 2]}

    app = pgbatch.App(settings=settings_for(empty_database))
    app.use(llm.WORKLOAD)
    async with app:
        kept = await app.get_batch(old.id)
        assert (kept.task, kept.total_items, kept.tenant) == ("echo", 2, "acme")
        stored = await service.store_file(
            app, "acme", filename="f.jsonl", purpose="batch", content=io.BytesIO(b"x\n"), size=2
        )
        assert (await service.get_file(app, "acme", stored["id"]))["bytes"] == 2
        async with app.db.connection() as conn:
            assert await applied_versions(conn, component) == {1, 2}
            assert await pending_migrations(conn, [component]) == {}
