"""`pgbatch workers`, `pgbatch queues`, `pgbatch queue pause|resume` and the waiting line
of `pgbatch status`, as subprocesses against a real PostgreSQL and a real worker process."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import CHAOS_APP, WorkerGroup, run_cli, wait_until

ENV = {
    "PGBATCH_WORKER_BEAT_S": "0.1",
    "PGBATCH_WORKER_TTL_S": "2",
    "PGBATCH_POLL_INTERVAL_S": "0.2",
}
SUBMITTED = re.compile(r"batch (\d+): ")


@pytest.mark.asyncio
async def test_workers_queues_and_pause_from_the_command_line(
    database_url: str, tmp_path: Path
) -> None:
    items = tmp_path / "items.ndjson"
    items.write_text("".join(f"{i}\n" for i in range(3)))
    submitted = await run_cli(
        "submit", "chaos", str(items), "--app", CHAOS_APP, database_url=database_url, env=ENV
    )
    assert submitted.code == 0, submitted.output
    match = SUBMITTED.search(submitted.stdout)
    assert match, submitted.output
    batch_id = match.group(1)

    # No worker yet: status says why the batch waits, in text and JSON.
    status = await run_cli("status", batch_id, database_url=database_url, env=ENV)
    assert "no live worker serves task 'chaos'" in status.stdout, status.output
    as_json = await run_cli("status", batch_id, "--json", database_url=database_url, env=ENV)
    assert json.loads(as_json.stdout)["waiting_reason"] == "no_live_worker"
    recent = await run_cli("status", "--json", database_url=database_url, env=ENV)
    assert [b["waiting_reason"] for b in json.loads(recent.stdout)] == ["no_live_worker"]
    listed = await run_cli("status", database_url=database_url, env=ENV)
    assert f"batch {batch_id}: waiting: no live worker" in listed.stdout, listed.output

    paused = await run_cli("queue", "pause", "default", database_url=database_url, env=ENV)
    assert paused.code == 0 and "paused" in paused.stdout, paused.output
    listed = json.loads(
        (await run_cli("queues", "--json", database_url=database_url, env=ENV)).stdout
    )
    assert [(q["name"], q["paused"], q["queued_shards"]) for q in listed] == [("default", True, 1)]
    status = await run_cli("status", batch_id, database_url=database_url, env=ENV)
    assert "queue 'default' is paused" in status.stdout, status.output

    group = WorkerGroup(database_url, tmp_path, env=ENV)
    try:
        process = group.start(name="w", concurrency=3)

        async def registered() -> list[dict[str, object]]:
            result = await run_cli("workers", "--json", database_url=database_url, env=ENV)
            assert result.code == 0, result.output
            return [w for w in json.loads(result.stdout) if w["pid"] == process.pid]

        [worker] = await wait_until(registered, 60, message=group.logs)
        assert worker["concurrency"] == 3 and worker["expired"] is False
        assert "chaos" in worker["tasks"]  # type: ignore[operator]
        table = await run_cli("workers", database_url=database_url, env=ENV)
        assert "live" in table.stdout and "0/3" in table.stdout, table.output

        resumed = await run_cli("queue", "resume", "default", database_url=database_url, env=ENV)
        assert resumed.code == 0 and "resumed" in resumed.stdout, resumed.output

        async def finished() -> bool:
            result = await run_cli("status", batch_id, "--json", database_url=database_url)
            return json.loads(result.stdout)["status"] == "succeeded"

        await wait_until(finished, 60, message=group.logs)
    finally:
        group.stop_all()
    # A bad name is a message and exit code 2, never a traceback.
    bad = await run_cli("queue", "pause", "x" * 201, database_url=database_url, env=ENV)
    assert bad.code == 2 and "queue name" in bad.stderr and "Traceback" not in bad.output
