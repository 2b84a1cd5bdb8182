"""Vector libraries made with a foreign key on their chunk tables upgrade in place (0003).

Release 0f9bd03 made each library's chunk table with `document_id REFERENCES
pgbatch.vector_documents ON DELETE CASCADE` (tests/fixtures/0f9bd03_vector_libraries.sql
is its DDL, verbatim, with indexed documents). Its database has only the vectors
migration 0001: the runner is given that one alone. Opening this release applies the
rest; the foreign keys are gone, the chunks are untouched, and deleting works without
them. It needs pgvector (the chunk tables have vector columns).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgbatch
from pgbatch.db.migrations import Component, migrate
from pgbatch.workloads import vectors
from tests.conftest import settings_for
from tests.helpers import has_pgvector

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "0f9bd03_vector_libraries.sql"
CHUNKS = (
    "SELECT 1 AS library, document_id, seq, content_version, text, embedding::text"
    " FROM pgbatch.vector_chunks_1"
    " UNION ALL SELECT 2, document_id, seq, content_version, text, embedding::text"
    " FROM pgbatch.vector_chunks_2 ORDER BY 1, 2, 3"
)
FOREIGN_KEYS = (
    "SELECT count(*) FROM pg_constraint WHERE contype = 'f'"
    " AND conrelid IN ('pgbatch.vector_chunks_1'::regclass, 'pgbatch.vector_chunks_2'::regclass)"
)


def _first_migration_only(root: Path) -> Component:
    """The vectors component as release 0f9bd03 shipped it: migration 0001 alone."""
    package = root / "vectors_0f9bd03"
    (package / "migrations").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    shipped = resources.files("pgbatch.workloads.vectors").joinpath("migrations")
    first = shipped.joinpath("0001_vectors.sql").read_text(encoding="utf-8")
    (package / "migrations" / "0001_vectors.sql").write_text(first, encoding="utf-8")
    return Component(vectors.WORKLOAD.name, package.name)


async def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute(sql)
        return await cur.fetchall()


@pytest.mark.asyncio
async def test_chunk_tables_of_the_previous_release_lose_their_foreign_key_in_place(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not has_pgvector(database_url):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")
    monkeypatch.syspath_prepend(str(tmp_path))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await migrate(conn, components=[_first_migration_only(tmp_path)])
        await conn.execute(FIXTURE.read_text(encoding="utf-8"))
    before = await _rows(database_url, CHUNKS)
    assert len(before) == 5
    assert await _rows(database_url, FOREIGN_KEYS) == [(2,)]

    app = pgbatch.App(settings=settings_for(database_url))
    app.use(vectors.WORKLOAD)
    await app.open()
    try:
        versions = await _rows(
            database_url,
            "SELECT version FROM pgbatch.workload_migrations WHERE component = 'vectors'",
        )
        assert (3,) in versions
        assert await _rows(database_url, FOREIGN_KEYS) == [(0,)]
        assert await _rows(database_url, CHUNKS) == before
        # Idempotent: run again on a database that has no such constraint left.
        shipped = resources.files("pgbatch.workloads.vectors").joinpath("migrations")
        again = shipped.joinpath("0003_chunks_without_foreign_key.sql").read_text("utf-8")
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
            await conn.execute(again)
        assert await _rows(database_url, CHUNKS) == before

        # The upgraded libraries work: search, and deletes that leave no chunk behind.
        hits = await vectors.search(app, 1, tenant="t", vector=[1.0, 0.0, 0.0, 0.0], k=1)
        assert [(h.document_id, h.seq) for h in hits] == [(1, 0)]
        first = await vectors.get_document(app, 1, 1, tenant="t")
        await vectors.delete_document(app, 1, 1, tenant="t", version=first.version)
        assert [r[1:3] for r in await _rows(database_url, CHUNKS)] == [(2, 0), (3, 0), (3, 1)]
        library = await vectors.get_library(app, 2, tenant="u")
        await vectors.delete_library(app, 2, tenant="u", version=library.version)
        assert await _rows(
            database_url,
            "SELECT (SELECT count(*) FROM pgbatch.vector_documents WHERE library_id = 2),"
            " to_regclass('pgbatch.vector_chunks_2')",
        ) == [(0, None)]
    finally:
        await app.close()
