"""`pgbatch prune` and `submit --retention-s/--keep-forever`, as real subprocesses."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.test_cli import FINISH_S, SUBMITTED, WORKER_ENV
from tests.helpers import CHAOS_APP, WorkerGroup, fetch_one, run_cli, wait_until


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerGroup]:
    group = WorkerGroup(database_url, tmp_path, env=WORKER_ENV)
    yield group
    group.stop_all()
    print(group.logs())  # shown by pytest only when the test failed


async def _submit(database_url: str, tmp_path: Path, *options: str) -> int:
    path = tmp_path / f"items-{uuid.uuid4().hex[:6]}.ndjson"
    path.write_text("\n".join(json.dumps(n) for n in range(6)) + "\n")
    result = await run_cli("submit", "slow", str(path), "--app", CHAOS_APP, *options,
                           database_url=database_url)  # fmt: skip
    assert result.code == 0, result.output
    match = SUBMITTED.search(result.stdout)
    assert match, result.stdout
    return int(match.group(1))


async def _final(database_url: str, batch_id: int) -> bool:
    row = await fetch_one(
        database_url, "SELECT finished_at IS NOT NULL FROM pgbatch.batches WHERE id = %s",
        (batch_id,),
    )  # fmt: skip
    return bool(row and row[0])


@pytest.mark.asyncio
async def test_prune_dry_run_then_prune_then_a_pruned_batch_says_so(
    database_url: str, tmp_path: Path, workers: WorkerGroup
) -> None:
    expiring = await _submit(database_url, tmp_path, "--retention-s", "0")
    kept = await _submit(database_url, tmp_path, "--keep-forever")
    default = await _submit(database_url, tmp_path)
    workers.start()
    for batch_id in (expiring, kept, default):
        await wait_until(lambda b=batch_id: _final(database_url, b), FINISH_S)

    dry = await run_cli("prune", "--dry-run", "--json", database_url=database_url)
    assert dry.code == 0, dry.output
    assert [b["id"] for b in json.loads(dry.stdout)["batches"]] == [expiring]
    assert await _final(database_url, expiring)  # a dry run removes nothing

    done = await run_cli("prune", "--json", database_url=database_url)
    assert done.code == 0, done.output
    assert json.loads(done.stdout)["pruned"] == [expiring]

    shown = await run_cli("status", str(expiring), database_url=database_url)
    assert shown.code == 1 and "Traceback" not in shown.output
    assert re.search(rf"batch {expiring} was pruned at \S+", shown.output), shown.output
    again = await run_cli("retry", str(expiring), database_url=database_url)
    assert again.code == 1 and "was pruned at" in again.output

    # --finished-before takes kept-forever and default batches too.
    bad = await run_cli("prune", "--finished-before", "yesterday", database_url=database_url)
    assert bad.code == 2 and "--finished-before" in bad.output and "Traceback" not in bad.output
    old = await run_cli("prune", "--finished-before", "2999-01-01", "--json",
                        database_url=database_url)  # fmt: skip
    assert old.code == 0, old.output
    assert sorted(json.loads(old.stdout)["pruned"]) == sorted([kept, default])
    left = await fetch_one(database_url, "SELECT count(*) FROM pgbatch.batches")
    assert left == (0,)


@pytest.mark.asyncio
async def test_submit_refuses_a_negative_retention_and_both_options(
    database_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "items.ndjson"
    path.write_text("1\n")
    for options in (("--retention-s", "-5"), ("--retention-s", "5", "--keep-forever")):
        result = await run_cli("submit", "slow", str(path), "--app", CHAOS_APP, *options,
                               database_url=database_url)  # fmt: skip
        assert result.code != 0 and "Traceback" not in result.output, result.output
        assert "retention" in result.output or "keep-forever" in result.output
    assert await fetch_one(database_url, "SELECT count(*) FROM pgbatch.batches") == (0,)
