"""Shared fixtures: a real PostgreSQL (embedded, or DATABASE_URL) and a fresh database per test.

Each test gets its own database cloned from a migrated template (CREATE DATABASE …
TEMPLATE), which is fast and keeps tests isolated from one another.
"""

from __future__ import annotations

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
