"""`pgbatch worker --metrics-port`: a worker process's own Prometheus metrics."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

import pgbatch
from tests.apps.chaos_app import build_app
from tests.helpers import WorkerProcess, port_in_log, wait_until

START_S = 30.0


def _samples(text: str, name: str) -> dict[str, float]:
    found = {}
    for line in text.splitlines():
        match = re.match(rf"^{name}(\{{[^}}]*\}})? (\S+)$", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


@pytest.mark.asyncio
async def test_a_worker_serves_its_counters_and_flush_sizes(
    database_url: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(database_url, tmp_path / "worker.log", args=["--metrics-port", "0"])
    try:
        port = await port_in_log(
            lambda: worker.log_path.read_text(errors="replace"),
            "metrics: http://127.0.0.1:",
            START_S,
        )
        app = build_app(pgbatch.Settings(database_url=database_url))
        async with app:
            # A task without sleeps: 50 shards of 10 items.
            batch = await app.submit("fails_until_fixed", range(500), shard_size=10)
            await app.wait(batch.id, timeout_s=START_S)

        async def scrape() -> str | None:
            try:
                async with httpx.AsyncClient() as client:
                    text = (await client.get(f"http://127.0.0.1:{port}/")).text
            except httpx.TransportError:
                return None
            completed = _samples(text, "pgbatch_worker_shards_completed_total")
            return text if completed.get("") == 50 else None

        text = await wait_until(
            scrape, START_S, message=lambda: worker.log_path.read_text(errors="replace")
        )
    finally:
        worker.terminate()
        worker.process.wait(30)
    flushes = _samples(text, "pgbatch_flush_size_count")
    shards = _samples(text, "pgbatch_flush_size_sum")
    assert flushes['{committer="completer"}'] >= 1
    assert shards['{committer="completer"}'] == 50
    assert _samples(text, "pgbatch_worker_claims_total")[""] >= 1
