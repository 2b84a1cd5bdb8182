"""Apply the versioned SQL migrations under an advisory lock."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from pgbatch.db.queries import query
from pgbatch.errors import MigrationError

__all__ = ["Migration", "applied_versions", "available_migrations", "migrate"]

# Any constant works as long as every pgbatch process uses the same one: it serialises
# migrations when ten workers start at once.
MIGRATION_LOCK_KEY = 0x70676261746368  # "pgbatch"

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its version number, name and SQL."""

    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    """Return the packaged migrations in version order."""
    found: list[Migration] = []
    folder = resources.files("pgbatch.db").joinpath("migrations")
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations share a version: {versions}")
    return found


async def applied_versions(conn: psycopg.AsyncConnection[Any]) -> set[int]:
    """Return the versions recorded as applied (empty if pgbatch was never installed)."""
    exists = await (await conn.execute(query("migration_table_exists"))).fetchone()
    if not exists or not exists[0]:
        return set()
    rows = await (await conn.execute(query("migration_applied_versions"))).fetchall()
    return {row[0] for row in rows}


async def migrate(conn: psycopg.AsyncConnection[Any], *, up_to: int | None = None) -> list[int]:
    """Apply pending migrations in one locked transaction; return the versions applied.

    `up_to` stops after that version (tests build an old schema with it); None applies all.
    """
    applied_now: list[int] = []
    pending = [m for m in available_migrations() if up_to is None or m.version <= up_to]
    if await applied_versions(conn) >= {m.version for m in pending}:
        return applied_now  # fast path: nothing to do, no lock taken
    async with conn.transaction():
        # A migration must wait for the locks it needs, however long workers hold them:
        # the session's lock_timeout (invariant 7) would fail it half-way otherwise.
        await conn.execute(query("migration_wait_for_locks"))
        await conn.execute(query("migration_lock"), {"key": MIGRATION_LOCK_KEY})
        await conn.execute(query("migration_bootstrap"))
        done = await applied_versions(conn)
        for migration in pending:
            if migration.version in done:
                continue
            try:
                await conn.execute(migration.sql)
            except psycopg.Error as exc:
                raise MigrationError(
                    f"migration {migration.version:04d}_{migration.name} failed: {exc}"
                ) from exc
            await conn.execute(
                query("migration_record"), {"version": migration.version, "name": migration.name}
            )
            applied_now.append(migration.version)
    return applied_now
