"""A first run on the embedded server is quiet, and says which database it uses."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import CHAOS_APP, REPO_ROOT, run_cli, subprocess_env, wait_until

# initdb, the server's start and the migrations take a few seconds on two busy cores.
START_S = 60.0


@pytest.mark.asyncio
async def test_a_first_worker_run_keeps_the_servers_logs_in_a_file(
    database_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "fresh"
    env = {"DATABASE_URL": "", "PGBATCH_DATA_DIR": str(data_dir)}
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pgbatch", "worker", "--app", CHAOS_APP],
            cwd=REPO_ROOT, env=subprocess_env(database_url, env),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        await wait_until(
            lambda: " started: " in log_path.read_text(), START_S, message=log_path.read_text
        )
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        await run_cli("db", "stop", database_url=database_url, env=env)
    output = log_path.read_text()
    resolved = data_dir.resolve()
    assert f"database: embedded PostgreSQL in {resolved}, created now" in output, output
    assert f"start-up log: {resolved / 'embedded-postgres.log'}" in output, output
    # The ~55 lines of initdb and pg_ctl output went to that file, not to the terminal.
    assert "initdb" not in output and "embedded_postgres" not in output, output
    assert len(output.splitlines()) <= 12, output
    start_up = (resolved / "embedded-postgres.log").read_text()
    assert "initdb" in start_up and "server started" in start_up, start_up


@pytest.mark.asyncio
async def test_submit_names_the_database_url_it_uses_without_its_password(
    database_url: str, tmp_path: Path
) -> None:
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    items = tmp_path / "items.ndjson"
    items.write_text('{"n": 1}\n')
    # The test server trusts local connections: the password is sent and ignored.
    with_password = make_conninfo(database_url, password="s3cret-pw")
    result = await run_cli("submit", "slow", str(items), "--app", CHAOS_APP,
                           database_url=with_password)  # fmt: skip
    assert result.code == 0, result.output
    params = conninfo_to_dict(database_url)
    host = str(params["host"])
    # The embedded server is reached on its socket directory, a TCP server on host:port.
    place = (
        f"the socket in {host}" if host.startswith("/") else f"{host}:{params.get('port', 5432)}"
    )
    assert f"database: {params['dbname']} on {place} (DATABASE_URL)" in result.stderr, result.output
    assert "s3cret-pw" not in result.output
