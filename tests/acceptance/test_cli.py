"""The `pgbatch` command line, run as real subprocesses against a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from pgbatch.db.verify import verify_batch
from tests.apps.chaos_app import FAILING_ENV
from tests.helpers import (
    CHAOS_APP,
    CliResult,
    WorkerGroup,
    fetch_all,
    fetch_one,
    run_cli,
    wait_until,
)

WORKER_ENV = {
    "PGBATCH_RESCUE_INTERVAL_S": "0.2",
    "PGBATCH_POLL_INTERVAL_S": "0.2",
    "PGBATCH_RETRY_BACKOFF_BASE_S": "0.01",
    "PGBATCH_RETRY_BACKOFF_MAX_S": "0.05",
}
# Bound on a few small shards run by a worker process, start-up included.
FINISH_S = 60.0
# `submit` prints this line; the tests read the batch id from it.
SUBMITTED = re.compile(r"batch (\d+): (\d+) items in (\d+) shards")


@pytest.fixture
def workers(database_url: str, tmp_path: Path) -> Iterator[WorkerGroup]:
    group = WorkerGroup(database_url, tmp_path, env=WORKER_ENV)
    yield group
    group.stop_all()
    print(group.logs())  # shown by pytest only when the test failed


def _items_file(tmp_path: Path, count: int, *, bad_line: int | None = None) -> Path:
    path = tmp_path / f"items-{uuid.uuid4().hex[:6]}.ndjson"
    lines = [json.dumps({"n": n, "text": f"item {n}"}) for n in range(count)]
    if bad_line is not None:
        lines[bad_line - 1] = "{not json"
    path.write_text("\n".join(lines) + "\n")
    return path


async def _submit(database_url: str, task: str, path: Path, *options: str) -> int:
    result = await run_cli("submit", task, str(path), "--app", CHAOS_APP, *options,
                           database_url=database_url)  # fmt: skip
    assert result.code == 0, result.output
    match = SUBMITTED.search(result.stdout)
    assert match, result.output
    return int(match.group(1))


def _assert_clean_failure(result: CliResult, *fragments: str) -> None:
    """A bad input: a non-zero exit, a readable message naming the problem, no traceback."""
    assert result.code != 0, result.output
    assert "Traceback" not in result.output, result.output
    assert "error" in result.stderr.lower(), result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


async def _batch_count(database_url: str) -> int:
    (count,) = await fetch_one(database_url, "SELECT count(*) FROM pgbatch.batches")
    return int(count)


async def _wait_finished(database_url: str, batch_id: int, workers: WorkerGroup) -> None:
    async def finished() -> bool:
        row = await fetch_one(
            database_url,
            "SELECT finished_at IS NOT NULL FROM pgbatch.batches WHERE id = %s",
            (batch_id,),
        )
        return bool(row and row[0])

    await wait_until(finished, FINISH_S, message=workers.logs)


async def _verify(database_url: str, batch_id: int) -> Any:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await verify_batch(conn, batch_id)


@pytest.mark.asyncio
async def test_migrate_applies_once_then_is_idempotent(server_url: str) -> None:
    name = f"pgbatch_t_{uuid.uuid4().hex[:12]}"
    admin = make_conninfo(server_url, dbname="postgres")
    async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
        await conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(server_url, dbname=name)
    try:
        # Three at once on an empty database: the advisory lock lets exactly one apply.
        first = await asyncio.gather(*(run_cli("migrate", database_url=url) for _ in range(3)))
        for result in first:
            assert result.code == 0, result.output
        assert sum("applied migrations" in r.stdout for r in first) == 1, first
        again = await run_cli("migrate", database_url=url)
        assert again.code == 0, again.output
        assert "schema is up to date" in again.stdout
        versions = await fetch_all(url, "SELECT version FROM pgbatch.schema_migrations")
        assert versions and len(versions) == len(set(versions))
    finally:
        async with await psycopg.AsyncConnection.connect(admin, autocommit=True) as conn:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.asyncio
async def test_submit_prints_the_id_and_status_shows_it(database_url: str, tmp_path: Path) -> None:
    batch_id = await _submit(database_url, "slow", _items_file(tmp_path, 12), "--shard-size", "4")
    row = await fetch_one(
        database_url,
        "SELECT task, total_items, total_shards, shard_size, status FROM pgbatch.batches "
        "WHERE id = %s",
        (batch_id,),
    )
    assert row == ("slow", 12, 3, 4, "pending")

    listed = await run_cli("status", database_url=database_url)
    assert listed.code == 0, listed.output
    assert re.search(rf"\b{batch_id}\b.*\bslow\b.*\bpending\b.*0/12", listed.stdout), listed.stdout

    shown = await run_cli("status", str(batch_id), database_url=database_url)
    assert shown.code == 0, shown.output
    assert re.search(rf"\b{batch_id}\b.*\bslow\b.*\bpending\b.*0/3", shown.stdout), shown.stdout


@pytest.mark.asyncio
async def test_cancel_stops_queued_and_running_shards(
    database_url: str, tmp_path: Path, workers: WorkerGroup
) -> None:
    # 8 shards that block on their first attempt; a worker runs 2 of them.
    batch_id = await _submit(database_url, "hang_first", _items_file(tmp_path, 40),
                             "--on-complete", "record_done")  # fmt: skip
    workers.start(concurrency=2)

    async def two_running() -> bool:
        rows = await fetch_all(
            database_url,
            "SELECT id FROM pgbatch.shards WHERE batch_id = %s AND status = 'running'",
            (batch_id,),
        )
        return len(rows) == 2

    await wait_until(two_running, FINISH_S, message=workers.logs)
    result = await run_cli("cancel", str(batch_id), database_url=database_url)
    assert result.code == 0, result.output
    assert f"batch {batch_id} cancelled" in result.stdout
    # Queued shards stop in the cancel itself; running ones at their next heartbeat.
    await _wait_finished(database_url, batch_id, workers)

    row = await fetch_one(
        database_url,
        "SELECT status, shards_done, total_shards, items_ok, items_failed, items_cancelled"
        " FROM pgbatch.batches WHERE id = %s",
        (batch_id,),
    )
    # Queued and running shards' items alike count as cancelled, not failed (issue 12 §3).
    assert row == ("cancelled", 8, 8, 0, 0, 40)
    statuses = await fetch_all(
        database_url,
        "SELECT status, count(*) FROM pgbatch.shards WHERE batch_id = %s GROUP BY status",
        (batch_id,),
    )
    assert statuses == [("cancelled", 8)]
    check = await _verify(database_url, batch_id)
    assert check.every_item_has_one_result and check.results_ok == 0, check
    errors = await fetch_all(
        database_url,
        "SELECT DISTINCT error FROM pgbatch.results WHERE batch_id = %s",
        (batch_id,),
    )
    assert errors == [("cancelled",)]
    assert (check.callbacks_inserted, check.callbacks_done) == (1, 1), check

    again = await run_cli("cancel", str(batch_id), database_url=database_url)
    assert again.code == 0, again.output
    assert "already ended" in again.stdout
    shown = await run_cli("status", str(batch_id), "--json", database_url=database_url)
    document = json.loads(shown.stdout)
    assert (document["items_failed"], document["items_cancelled"]) == (0, 40), document
    assert document["waiting_s"] is not None and document["running_s"] is not None, document
    # Nothing ran: the table says 0 of 40 items, and 40 cancelled, not 40/40.
    table = await run_cli("status", str(batch_id), database_url=database_url)
    assert re.search(r"\bcancelled\b.*\b0/40\b.*\b0\b.*\b0\b.*\b40\b", table.stdout), table.stdout
    assert "40/40" not in table.stdout, table.stdout

    watched = await run_cli("watch", str(batch_id), database_url=database_url, timeout_s=30)
    assert watched.code == 0, watched.output
    assert f"batch {batch_id} cancelled: 0 ok, 0 failed, 40 cancelled" in watched.stdout


@pytest.mark.asyncio
async def test_retry_requeues_dead_shards_and_a_worker_reruns_them(
    database_url: str, tmp_path: Path, workers: WorkerGroup
) -> None:
    batch_id = await _submit(database_url, "fails_until_fixed", _items_file(tmp_path, 30),
                             "--max-attempts", "2", "--on-complete", "record_done")  # fmt: skip
    broken = workers.start(name="broken", concurrency=4, env={FAILING_ENV: "1"})
    await _wait_finished(database_url, batch_id, workers)
    broken.terminate()
    assert await broken.wait_exit(30) == 0

    row = await fetch_one(
        database_url,
        "SELECT status, shards_dead, items_failed, run_no FROM pgbatch.batches WHERE id = %s",
        (batch_id,),
    )
    assert row == ("failed", 3, 30, 1)
    status = await run_cli("status", str(batch_id), database_url=database_url)
    assert status.code == 0, status.output
    assert "the handler is broken" in status.stdout

    result = await run_cli("retry", str(batch_id), database_url=database_url)
    assert result.code == 0, result.output
    assert f"batch {batch_id}: 3 shards re-queued" in result.stdout
    shards = await fetch_all(
        database_url,
        "SELECT status, attempts FROM pgbatch.shards WHERE batch_id = %s",
        (batch_id,),
    )
    assert shards == [("queued", 0)] * 3

    workers.start(name="fixed", concurrency=4)
    await _wait_finished(database_url, batch_id, workers)
    row = await fetch_one(
        database_url,
        "SELECT status, shards_done, shards_dead, items_ok, items_failed, run_no "
        "FROM pgbatch.batches WHERE id = %s",
        (batch_id,),
    )
    assert row == ("succeeded", 3, 0, 30, 0, 2)
    check = await _verify(database_url, batch_id)
    assert check.every_item_has_one_result and check.results_ok == 30, check
    (user_rows,) = await fetch_one(
        database_url,
        "SELECT count(*) FROM chaos_rows WHERE batch_id = %s",
        (batch_id,),
    )
    assert user_rows == 30

    # One callback per run of the batch, each run once.
    async def both_callbacks() -> list[Any] | None:
        rows = await fetch_all(
            database_url,
            "SELECT run_no, status FROM chaos_callbacks WHERE batch_id = %s ORDER BY run_no",
            (batch_id,),
        )
        return rows if len(rows) >= 2 else None

    callbacks = await wait_until(both_callbacks, FINISH_S, message=workers.logs)
    assert callbacks == [(1, "failed"), (2, "succeeded")]

    watched = await run_cli("watch", str(batch_id), database_url=database_url, timeout_s=30)
    assert watched.code == 0, watched.output
    assert f"batch {batch_id} succeeded: 30 ok, 0 failed" in watched.stdout


BAD_INPUTS: list[tuple[str, list[str], list[str]]] = [
    # (case, arguments after `pgbatch`, fragments the message must contain)
    ("unknown task", ["submit", "nosuchtask", "{items}", "--app", CHAOS_APP], ["nosuchtask"]),
    ("shard size 0", ["submit", "slow", "{items}", "--app", CHAOS_APP, "--shard-size", "0"],
     ["shard_size"]),
    ("not JSON, first chunk", ["submit", "slow", "{bad3}", "--app", CHAOS_APP], [":3:", "JSON"]),
    # Past the first COPY chunk (2,000 items): rows already sent must be rolled back.
    ("not JSON, later chunk", ["submit", "slow", "{bad4500}", "--app", CHAOS_APP],
     [":4500:", "JSON"]),
    ("not UTF-8", ["submit", "slow", "{latin1}", "--app", CHAOS_APP], [":2:", "UTF-8"]),
    ("no items file", ["submit", "slow", "{missing}", "--app", CHAOS_APP], ["no such file"]),
    ("status of unknown id", ["status", "424242"], ["424242"]),
    ("cancel of unknown id", ["cancel", "424242"], ["424242"]),
    ("retry of unknown id", ["retry", "424242"], ["424242"]),
    ("watch of unknown id", ["watch", "424242"], ["424242"]),
    ("app module missing", ["submit", "slow", "{items}", "--app", "no_such_module:app"],
     ["no_such_module"]),
    ("app attribute missing", ["submit", "slow", "{items}", "--app", "tests.apps.chaos_app:nope"],
     ["tests.apps.chaos_app:nope"]),
    ("app without attribute", ["submit", "slow", "{items}", "--app", "tests.apps.chaos_app"],
     ["module:attribute"]),
    ("worker, app module missing", ["worker", "--app", "no_such_module:app"], ["no_such_module"]),
]  # fmt: skip


@pytest.mark.asyncio
@pytest.mark.parametrize(("args", "fragments"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])  # fmt: skip
async def test_bad_input_fails_cleanly_and_writes_nothing(
    database_url: str, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    files = {
        "items": _items_file(tmp_path, 10),
        "bad3": _items_file(tmp_path, 10, bad_line=3),
        "bad4500": _items_file(tmp_path, 5000, bad_line=4500),
        "missing": tmp_path / "missing.ndjson",
        "latin1": tmp_path / "latin1.ndjson",
    }
    files["latin1"].write_bytes(b'{"n": 1}\n{"text": "caf\xe9"}\n')  # Latin-1, not UTF-8
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in args]
    result = await run_cli(*argv, database_url=database_url, timeout_s=60)
    _assert_clean_failure(result, *fragments)
    assert await _batch_count(database_url) == 0
    (items,) = await fetch_one(database_url, "SELECT count(*) FROM pgbatch.items")
    assert items == 0


# Strings a user controls (task names, handler errors) that Rich would read as markup:
# an unbalanced closing tag made `status` die with a MarkupError, a balanced one vanished.
HOSTILE_TASK = "[bold]x[/bold]"
HOSTILE_ERROR = "boom [/red] [link=http://evil.example]click[/link] [bold]"


@pytest.mark.asyncio
async def test_status_prints_user_strings_as_they_are(database_url: str) -> None:
    import pgbatch
    from tests.conftest import settings_for

    app = pgbatch.App(settings=settings_for(database_url))

    @app.task(name=HOSTILE_TASK, max_attempts=1)
    async def failing(items: list[pgbatch.Item], _: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        return [pgbatch.error(HOSTILE_ERROR) for _ in items]

    async with app:
        batch = await app.submit(HOSTILE_TASK, [{"n": 1}, {"n": 2}])
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            final = await app.wait(batch.id, timeout_s=FINISH_S)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
    assert final.items_failed == 2

    listed = await run_cli("status", database_url=database_url)
    assert listed.code == 0, listed.output
    assert HOSTILE_TASK in listed.stdout, listed.stdout

    shown = await run_cli("status", str(batch.id), database_url=database_url)
    assert shown.code == 0, shown.output
    assert "Traceback" not in shown.output, shown.output
    assert HOSTILE_TASK in shown.stdout, shown.stdout
    assert HOSTILE_ERROR in shown.stdout, shown.stdout


@pytest.mark.asyncio
async def test_version_and_the_app_from_the_environment(database_url: str, tmp_path: Path) -> None:
    from importlib.metadata import version

    shown = await run_cli("--version", database_url=database_url)
    assert shown.code == 0, shown.output
    assert shown.stdout.strip() == f"pgbatch {version('pgbatch')}"

    # PGBATCH_APP stands in for --app on every command that takes one.
    path = _items_file(tmp_path, 3)
    result = await run_cli("submit", "slow", str(path), database_url=database_url,
                           env={"PGBATCH_APP": CHAOS_APP})  # fmt: skip
    assert result.code == 0, result.output
    assert SUBMITTED.search(result.stdout), result.output

    scripted = await run_cli("submit", "slow", str(path), "--json", "--shard-size", "2",
                             database_url=database_url, env={"PGBATCH_APP": CHAOS_APP})  # fmt: skip
    assert scripted.code == 0, scripted.output
    document = json.loads(scripted.stdout)
    assert (document["task"], document["total_items"], document["total_shards"]) == ("slow", 3, 2)
    assert document["status"] == "pending"


@pytest.mark.asyncio
@pytest.mark.parametrize("command", [["status"], ["status", "1"], ["watch", "1"], ["cancel", "1"],
                                     ["retry", "1"], ["results", "1"]])  # fmt: skip
async def test_a_read_command_in_the_wrong_folder_creates_no_server(
    database_url: str, tmp_path: Path, command: list[str]
) -> None:
    empty = tmp_path / "not-here"
    result = await run_cli(*command, database_url=database_url,
                           env={"DATABASE_URL": "", "PGBATCH_DATA_DIR": str(empty)})  # fmt: skip
    _assert_clean_failure(result, str(empty), "DATABASE_URL", "--database-url")
    assert not empty.exists(), "a new embedded server was created in the wrong folder"


@pytest.mark.asyncio
async def test_database_url_points_a_read_command_at_its_database(
    database_url: str, tmp_path: Path
) -> None:
    batch_id = await _submit(database_url, "slow", _items_file(tmp_path, 3))
    empty = tmp_path / "not-here"
    result = await run_cli("status", str(batch_id), "--json", "--database-url", database_url,
                           database_url=database_url,
                           env={"DATABASE_URL": "", "PGBATCH_DATA_DIR": str(empty)})  # fmt: skip
    assert result.code == 0, result.output
    assert json.loads(result.stdout)["id"] == batch_id
    assert not empty.exists()


@pytest.mark.asyncio
async def test_ctrl_c_in_watch_says_the_batch_keeps_running(
    database_url: str, tmp_path: Path
) -> None:
    import signal
    import sys

    from tests.helpers import REPO_ROOT, subprocess_env

    batch_id = await _submit(database_url, "slow", _items_file(tmp_path, 4))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pgbatch", "watch", str(batch_id), cwd=REPO_ROOT,
        env=subprocess_env(database_url), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip

    # No worker runs, so the batch stays pending: watch is waiting once it listens.
    async def listening() -> bool:
        (count,) = await fetch_one(
            database_url,
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND query LIKE 'LISTEN%%'",
        )
        return bool(count)

    await wait_until(listening, FINISH_S)
    process.send_signal(signal.SIGINT)
    _, stderr = await asyncio.wait_for(process.communicate(), FINISH_S)
    assert process.returncode == 130
    assert f"batch {batch_id} keeps running" in stderr.decode()
    assert "Traceback" not in stderr.decode()
    (status,) = await fetch_one(
        database_url, "SELECT status FROM pgbatch.batches WHERE id = %s", (batch_id,)
    )
    assert status == "pending"


@pytest.mark.asyncio
async def test_json_output_and_results_export(database_url: str, tmp_path: Path) -> None:
    import csv
    import io

    import pgbatch
    from tests.conftest import settings_for

    app = pgbatch.App(settings=settings_for(database_url))

    @app.task(name="half_fail", max_attempts=1)
    async def half_fail(
        items: list[pgbatch.Item], _: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        return [
            pgbatch.ok({"twice": item.value["n"] * 2})
            if item.value["n"] % 2 == 0
            else pgbatch.error(f"odd, {HOSTILE_ERROR}")
            for item in items
        ]

    async with app:
        batch = await app.submit("half_fail", [{"n": n} for n in range(10)], shard_size=1)
        worker = app.worker(concurrency=4)
        running = asyncio.create_task(worker.run())
        try:
            await app.wait(batch.id, timeout_s=FINISH_S)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)

    shown = await run_cli("status", str(batch.id), "--json", database_url=database_url)
    assert shown.code == 0, shown.output
    document = json.loads(shown.stdout)
    assert (document["id"], document["task"], document["items_ok"], document["items_failed"]) == (
        batch.id, "half_fail", 5, 5,
    )  # fmt: skip
    assert [s["seq"] for s in document["error_samples"]] == [1, 3, 5, 7, 9]
    assert document["error_samples"][0]["error"] == f"odd, {HOSTILE_ERROR}"
    assert document["error_groups"] == [
        {"error": f"odd, {HOSTILE_ERROR}", "items": 5, "first_seq": 1}
    ]
    text = await run_cli("status", str(batch.id), database_url=database_url)
    assert f"5 x (first item 1): odd, {HOSTILE_ERROR}" in text.stdout, text.output
    listed = json.loads((await run_cli("status", "--json", database_url=database_url)).stdout)
    assert [b["id"] for b in listed] == [batch.id]

    exported = await run_cli("results", str(batch.id), database_url=database_url)
    assert exported.code == 0, exported.output
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert [line["seq"] for line in lines] == list(range(10))
    assert lines[4] == {"seq": 4, "ok": True, "output": {"twice": 8}, "error": None}
    assert lines[3]["ok"] is False and lines[3]["error"] == f"odd, {HOSTILE_ERROR}"

    target = tmp_path / "errors.csv"
    written = await run_cli("results", str(batch.id), "--errors", "--format", "csv",
                            "-o", str(target), database_url=database_url)  # fmt: skip
    assert written.code == 0, written.output
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert rows[0] == ["seq", "ok", "output", "error"]
    assert [row[0] for row in rows[1:]] == ["1", "3", "5", "7", "9"]
    assert rows[1][1:] == ["false", "", f"odd, {HOSTILE_ERROR}"]
    assert not (tmp_path / "errors.csv.partial").exists()

    cancelled = await run_cli("cancel", str(batch.id), "--json", database_url=database_url)
    assert json.loads(cancelled.stdout) == {"batch_id": batch.id, "cancelled": False}
    retried = await run_cli("retry", str(batch.id), "--json", database_url=database_url)
    assert json.loads(retried.stdout) == {"batch_id": batch.id, "requeued_shards": 5}

    refused = await run_cli("results", str(batch.id), "--format", "xml", database_url=database_url)
    _assert_clean_failure(refused, "--format")
    missing = await run_cli("results", "424242", "-o", str(tmp_path / "none.ndjson"),
                            database_url=database_url)  # fmt: skip
    _assert_clean_failure(missing, "424242")
    assert not (tmp_path / "none.ndjson").exists()


def test_shell_completion_offers_commands_and_options() -> None:
    import subprocess
    import sys

    script = Path(sys.executable).parent / "pgbatch"

    def complete(words: str) -> list[str]:
        env = {"_PGBATCH_COMPLETE": "complete_bash", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - 1), "PATH": str(script.parent)}  # fmt: skip
        done = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("pgbatch sta") == ["status"]
    assert complete("pgbatch results 1 --fo") == ["--format"]


@pytest.mark.asyncio
async def test_sql_prints_a_query_with_its_includes_expanded(database_url: str) -> None:
    shown = await run_cli("sql", "batch_seal", database_url=database_url)
    assert shown.code == 0, shown.output
    assert "-- include:" not in shown.stdout and "WITH sealed AS" in shown.stdout
    copy = await run_cli("sql", "collection_copy_ids", "--workload", "collections",
                         database_url=database_url)  # fmt: skip
    assert copy.code == 0 and "-- include:" not in copy.stdout, copy.output
    _assert_clean_failure(await run_cli("sql", "nope", database_url=database_url), "nope")
