"""The collection-copy workload's queries: collections, items, the copy's fenced statements."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg

from pgbatch.db.queries import QueryMap
from pgbatch.db.shards import CommitStatement

__all__ = [
    "CopyCounts",
    "add_collection_items",
    "copy_counts",
    "copy_endpoints",
    "copy_ids_statement",
    "copy_ranges_statement",
    "count_collection_items",
    "create_collection",
    "delete_collection",
    "existing_collections",
    "generate_collection_items",
    "plan_copy_ranges",
    "prune_copy_stats",
]


query = QueryMap("pgbatch.workloads.collections")


@dataclass(frozen=True, slots=True)
class CopyCounts:
    """What the committed shards of one copy did, summed over its shards."""

    inserted: int
    already_present: int
    not_in_source: int


async def create_collection(
    conn: psycopg.AsyncConnection[Any], tenant: str, collection_id: str, *, name: str | None = None
) -> bool:
    """Create `tenant`'s collection; return False if it already existed."""
    cur = await conn.execute(
        query("collection_create"), {"tenant": tenant, "id": collection_id, "name": name}
    )
    return cur.rowcount == 1


async def delete_collection(
    conn: psycopg.AsyncConnection[Any], tenant: str, collection_id: str
) -> bool:
    """Delete `tenant`'s collection and its items; return False if it had no such one."""
    cur = await conn.execute(query("collection_delete"), {"tenant": tenant, "id": collection_id})
    return cur.rowcount == 1


async def existing_collections(
    conn: psycopg.AsyncConnection[Any], tenant: str, collection_ids: Sequence[str]
) -> set[str]:
    """Return which of `collection_ids` are `tenant`'s collections."""
    cur = await conn.execute(
        query("collections_existing"), {"tenant": tenant, "ids": list(collection_ids)}
    )
    return {row[0] for row in await cur.fetchall()}


async def add_collection_items(
    conn: psycopg.AsyncConnection[Any], tenant: str, collection_id: str, item_ids: Sequence[str]
) -> int:
    """Add items to `tenant`'s collection (present ones are skipped); return how many were new."""
    cur = await conn.execute(
        query("collection_items_add"),
        {"tenant": tenant, "collection_id": collection_id, "item_ids": list(item_ids)},
    )
    return cur.rowcount


async def generate_collection_items(
    conn: psycopg.AsyncConnection[Any],
    tenant: str,
    collection_id: str,
    count: int,
    *,
    prefix: str,
    first: int = 0,
) -> int:
    """Add `count` synthetic items `<prefix><n>` server-side; return how many were new."""
    cur = await conn.execute(
        query("collection_items_generate"),
        {
            "tenant": tenant,
            "collection_id": collection_id,
            "count": count,
            "prefix": prefix,
            "first": first,
        },
    )
    return cur.rowcount


async def count_collection_items(
    conn: psycopg.AsyncConnection[Any], tenant: str, collection_id: str
) -> int:
    """Return how many items `tenant`'s collection holds."""
    cur = await conn.execute(
        query("collection_items_count"), {"tenant": tenant, "collection_id": collection_id}
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def plan_copy_ranges(
    conn: psycopg.AsyncConnection[Any], tenant: str, source: str, *, keys_per_range: int
) -> list[tuple[str, str, int]]:
    """Cut the source's keys into ranges of `keys_per_range` keys; return (first, last, keys)."""
    cur = await conn.execute(
        query("collection_copy_plan_ranges"),
        {"tenant": tenant, "source": source, "keys": keys_per_range},
    )
    return [(first, last, int(keys)) for first, last, keys in await cur.fetchall()]


def copy_ranges_statement(
    *,
    batch_id: int,
    shard_id: int,
    source: str,
    target: str,
    ranges: Sequence[tuple[str, str]],
) -> CommitStatement:
    """Return the at-commit statement that copies the source's keys in `ranges` (inclusive).

    Both collections are the batch's tenant's: the statement reads the tenant from the batch.
    """
    return CommitStatement(
        query("collection_copy_ranges"),
        {
            "batch_id": batch_id,
            "shard_id": shard_id,
            "source": source,
            "target": target,
            "firsts": [first for first, _ in ranges],
            "lasts": [last for _, last in ranges],
        },
    )


def copy_ids_statement(
    *, batch_id: int, shard_id: int, source: str, target: str, item_ids: Sequence[str]
) -> CommitStatement:
    """Return the at-commit statement that copies the listed keys the source holds."""
    return CommitStatement(
        query("collection_copy_ids"),
        {
            "batch_id": batch_id,
            "shard_id": shard_id,
            "source": source,
            "target": target,
            "ids": list(item_ids),
        },
    )


async def copy_counts(conn: psycopg.AsyncConnection[Any], batch_id: int) -> CopyCounts:
    """Sum the counts the copy's committed shards recorded."""
    cur = await conn.execute(query("collection_copy_counts"), {"batch_id": batch_id})
    row = await cur.fetchone()
    assert row is not None
    return CopyCounts(int(row[0]), int(row[1]), int(row[2]))


async def copy_endpoints(
    conn: psycopg.AsyncConnection[Any], batch_id: int
) -> tuple[str, str] | None:
    """Return the copy's (source, target), or None if it has no items."""
    cur = await conn.execute(query("collection_copy_endpoints"), {"batch_id": batch_id})
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


async def prune_copy_stats(conn: psycopg.AsyncConnection[Any], batch_id: int, limit: int) -> int:
    """Delete up to `limit` copy statistics rows of a pruned batch; return how many.

    0 in a database without the workload's tables: `pgbatch prune` calls it whether or not
    the app it runs with uses collections.
    """
    exists = await (await conn.execute(query("collection_copy_stats_exists"))).fetchone()
    if not (exists and exists[0]):
        return 0
    cur = await conn.execute(
        query("collection_copy_stats_prune"), {"batch_id": batch_id, "limit": limit}
    )
    return cur.rowcount
