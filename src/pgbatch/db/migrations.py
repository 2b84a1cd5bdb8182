"""Apply the versioned SQL migrations under an advisory lock: pgbatch's and its workloads'.

pgbatch's own migrations are recorded in `pgbatch.schema_migrations`; a workload's (the
collection copy's tables, say) in `pgbatch.workload_migrations` under the workload's
name, so each component has its own version sequence and one runner, one lock and one
transaction apply them all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from pgbatch.db.queries import query
from pgbatch.errors import MigrationError

__all__ = [
    "CORE",
    "Component",
    "Migration",
    "applied_versions",
    "available_migrations",
    "migrate",
    "pending_migrations",
]

# Any constant works as long as every pgbatch process uses the same one: it serialises
# migrations when ten workers start at once.
MIGRATION_LOCK_KEY = 0x70676261746368  # "pgbatch"

_FILE_NAME = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True, slots=True)
class Component:
    """A sequence of migrations under one name: pgbatch's own, or one workload's.

    `package` holds a `migrations/` folder of `NNNN_name.sql` files.
    """

    name: str
    package: str


CORE = Component("pgbatch", "pgbatch.db")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its version number, name and SQL."""

    version: int
    name: str
    sql: str


def available_migrations(component: Component = CORE) -> list[Migration]:
    """Return a component's packaged migrations in version order."""
    found: list[Migration] = []
    folder = resources.files(component.package).joinpath("migrations")
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migrations of {component.name} share a version: {versions}")
    return found


async def applied_versions(
    conn: psycopg.AsyncConnection[Any], component: Component = CORE
) -> set[int]:
    """Return a component's versions recorded as applied (empty if none ever was)."""
    if component == CORE:
        exists = await (await conn.execute(query("migration_table_exists"))).fetchone()
        if not exists or not exists[0]:
            return set()
        rows = await (await conn.execute(query("migration_applied_versions"))).fetchall()
        return {row[0] for row in rows}
    exists = await (await conn.execute(query("workload_migration_table_exists"))).fetchone()
    if not exists or not exists[0]:
        return set()
    cur = await conn.execute(
        query("workload_migration_applied_versions"), {"component": component.name}
    )
    return {row[0] for row in await cur.fetchall()}


async def pending_migrations(
    conn: psycopg.AsyncConnection[Any], components: Sequence[Component] = ()
) -> dict[str, list[int]]:
    """Return, per component with any, the versions not yet applied (for /healthz, status)."""
    pending: dict[str, list[int]] = {}
    for component in _with_core(components):
        done = await applied_versions(conn, component)
        missing = [m.version for m in available_migrations(component) if m.version not in done]
        if missing:
            pending[component.name] = missing
    return pending


def _with_core(components: Sequence[Component]) -> list[Component]:
    ordered = [CORE]
    for component in components:
        if component not in ordered:
            ordered.append(component)
    return ordered


async def migrate(
    conn: psycopg.AsyncConnection[Any],
    *,
    up_to: int | None = None,
    components: Sequence[Component] = (),
) -> list[int]:
    """Apply pending migrations in one locked transaction; return pgbatch's versions applied.

    `components` are workloads whose migrations run after pgbatch's own. `up_to` stops
    pgbatch's own after that version (tests build an old schema with it); None applies all.
    """
    plan: list[tuple[Component, list[Migration]]] = []
    for component in _with_core(components):
        migrations = available_migrations(component)
        if component == CORE and up_to is not None:
            migrations = [m for m in migrations if m.version <= up_to]
        plan.append((component, migrations))
    for component, migrations in plan:
        if not await applied_versions(conn, component) >= {m.version for m in migrations}:
            break
    else:
        return []  # fast path: nothing to do, no lock taken
    applied_now: list[int] = []
    async with conn.transaction():
        # A migration must wait for the locks it needs, however long workers hold them:
        # the session's lock_timeout (invariant 7) would fail it half-way otherwise.
        await conn.execute(query("migration_wait_for_locks"))
        await conn.execute(query("migration_lock"), {"key": MIGRATION_LOCK_KEY})
        await conn.execute(query("migration_bootstrap"))
        for component, migrations in plan:
            done = await applied_versions(conn, component)
            for migration in migrations:
                if migration.version in done:
                    continue
                try:
                    await conn.execute(migration.sql)
                except psycopg.Error as exc:
                    raise MigrationError(
                        f"migration {component.name} {migration.version:04d}_{migration.name}"
                        f" failed: {exc}"
                    ) from exc
                await _record(conn, component, migration)
                if component == CORE:
                    applied_now.append(migration.version)
    return applied_now


async def _record(
    conn: psycopg.AsyncConnection[Any], component: Component, migration: Migration
) -> None:
    if component == CORE:
        await conn.execute(
            query("migration_record"), {"version": migration.version, "name": migration.name}
        )
    else:
        await conn.execute(
            query("workload_migration_record"),
            {"component": component.name, "version": migration.version, "name": migration.name},
        )
