"""`pgbatch libraries create | import | list | search` end to end, in processes of their own."""

from __future__ import annotations

from pathlib import Path

import orjson
import psycopg
import pytest

from tests.helpers import run_cli


@pytest.fixture
def needs_pgvector(database_url: str) -> None:
    """Skip, saying why, on a server without pgvector."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'"
        ).fetchone()
    if not (row and row[0]):
        pytest.skip("this PostgreSQL server has no pgvector (run without DATABASE_URL)")


@pytest.mark.asyncio
@pytest.mark.usefixtures("needs_pgvector")
async def test_create_import_list_search(database_url: str, tmp_path: Path) -> None:
    created = await run_cli("libraries", "create", "notes", "--json", database_url=database_url)
    assert created.code == 0, created.stderr
    library_id = orjson.loads(created.stdout)["id"]
    lines = [{"text": f"note {n} about postgres", "metadata": {"n": n % 2}} for n in range(30)]
    lines.append({"chunks": ["vacuum and freezing", "hnsw index"], "metadata": {"n": 7}})
    path = tmp_path / "docs.ndjson"
    path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
    imported = await run_cli(
        "libraries", "import", str(library_id), str(path), "--wait", database_url=database_url
    )
    assert imported.code == 0, imported.stderr
    assert "31 documents imported" in imported.stdout and "batch " in imported.stdout
    listed = await run_cli("libraries", "list", "--json", database_url=database_url)
    assert orjson.loads(listed.stdout)[0]["documents"] == {"indexed": 31}
    found = await run_cli(
        "libraries", "search", str(library_id), "vacuum freezing", "-k", "3", "--json",
        database_url=database_url,
    )  # fmt: skip
    assert found.code == 0, found.stderr
    assert orjson.loads(found.stdout)[0]["text"] == "vacuum and freezing"

    duplicate = await run_cli("libraries", "create", "notes", database_url=database_url)
    assert duplicate.code == 1 and "exists already" in duplicate.stderr
    assert "Traceback" not in duplicate.stderr
    bad = tmp_path / "bad.ndjson"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    refused = await run_cli(
        "libraries", "import", str(library_id), str(bad), database_url=database_url
    )
    assert refused.code == 1 and "bad.ndjson:2" in refused.stderr, refused.stderr
    assert "nothing was imported" in refused.stderr and "Traceback" not in refused.stderr
    # All or nothing: the good line before the bad one was not written either.
    listed = await run_cli("libraries", "list", "--json", database_url=database_url)
    assert orjson.loads(listed.stdout)[0]["documents"] == {"indexed": 31}
