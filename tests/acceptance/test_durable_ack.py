"""Invariant 5: the API answers a write only after its transaction committed.

The test holds the tables the writes need under a lock, so no write can commit; posts
sent meanwhile must stay unanswered. The server process is then SIGKILLed and the lock
released: a write answered 201 before its commit would now be missing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from tests.helpers import REPO_ROOT, port_in_log, subprocess_env, wait_until

START_S = 30.0
WRITES = 20
# How long the posts get to be (wrongly) answered while nothing can commit.
BLOCKED_S = 1.5


async def _post(client: httpx.AsyncClient, n: int) -> tuple[str, str] | None:
    """Post a batch (odd n) or a document (even n); return what a 201 acknowledged."""
    if n % 2:
        answer = await client.post(
            "/v1/batches",
            json={"task": "echo", "items": [n]},
            headers={"Idempotency-Key": f"ack-{n}"},
        )
        return ("batch", f"ack-{n}") if answer.status_code == 201 else None
    answer = await client.post(
        "/v1/documents", json={"identity": {"type": "ack", "id": str(n)}, "body": {}}
    )
    return ("document", answer.json()["key"]) if answer.status_code == 201 else None


@pytest.mark.asyncio
async def test_no_write_is_acknowledged_before_it_commits(
    database_url: str, tmp_path: Path
) -> None:
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "pgbatch", "serve", "--app", "tests.apps.api_app:app",
             "--port", "0"],
            cwd=REPO_ROOT, env=subprocess_env(database_url), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    acknowledged: list[tuple[str, str]] = []
    try:
        port = await port_in_log(
            lambda: log_path.read_text(errors="replace"), "running on http://127.0.0.1:", START_S
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            async def healthy() -> bool:
                try:
                    return (await client.get("/healthz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_until(healthy, START_S, message=lambda: log_path.read_text())
            # Warm up: the document tables and the writer exist, both paths have run.
            assert await _post(client, 1000) is not None
            assert await _post(client, 1001) is not None
            async with await psycopg.AsyncConnection.connect(database_url) as blocker:
                # SHARE mode: reads go on, every insert or update of these tables waits.
                await blocker.execute("LOCK TABLE pgbatch.documents, pgbatch.batches IN SHARE MODE")
                posts = [asyncio.ensure_future(_post(client, n)) for n in range(WRITES)]
                done, _ = await asyncio.wait(posts, timeout=BLOCKED_S)
                acknowledged = [
                    ack for task in done if task.exception() is None and (ack := task.result())
                ]
                server.kill()
                server.wait(30)
                await blocker.rollback()
            for task in posts:
                task.cancel()
            await asyncio.gather(*posts, return_exceptions=True)
    finally:
        server.kill()
        server.wait(30)
    with psycopg.connect(database_url) as conn:
        stored = {
            ("batch", row[0]) for row in conn.execute("SELECT idempotency_key FROM pgbatch.batches")
        } | {("document", str(row[0])) for row in conn.execute("SELECT key FROM pgbatch.documents")}
    missing = [ack for ack in acknowledged if ack not in stored]
    assert not missing, f"acknowledged but never committed: {missing}"
