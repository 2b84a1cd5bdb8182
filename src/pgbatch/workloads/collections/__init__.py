"""The collection-copy workload: collections of items, copied between in fenced batches.

`app.use(WORKLOAD)` registers the copy task, creates the tables (`pgbatch.collections`,
`pgbatch.collection_items`, `pgbatch.collection_copy_stats`) with the workload's
migrations when the app opens, and mounts `/v1/collections` when the app is served.
`copy.py` explains how a copy is cut into items and shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pgbatch.workload import Workload
from pgbatch.workloads.collections.copy import (
    KEYS_PER_ITEM,
    MAX_KEY_CHARS,
    MAX_KEYS_PER_ITEM,
    RANGES_PER_SHARD,
    TASK,
    CollectionNotFoundError,
    CopyReport,
    add_items,
    copy_collection_shard,
    copy_report,
    create_collection,
    create_tables,
    delete_collection,
    register_tasks,
    seed_items,
    submit_copy,
    submit_copy_or_find,
)
from pgbatch.workloads.collections.queries import prune_copy_stats

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = [
    "KEYS_PER_ITEM",
    "MAX_KEYS_PER_ITEM",
    "MAX_KEY_CHARS",
    "RANGES_PER_SHARD",
    "TASK",
    "WORKLOAD",
    "CollectionNotFoundError",
    "CopyReport",
    "add_items",
    "copy_collection_shard",
    "copy_report",
    "create_collection",
    "create_tables",
    "delete_collection",
    "install",
    "seed_items",
    "submit_copy",
    "submit_copy_or_find",
]


def install(app: App) -> None:
    """Use the workload on `app`: the same as `app.use(WORKLOAD)`.

    On an app already open, `await create_tables(app)` then applies its migrations.
    """
    app.use(WORKLOAD)


def _router() -> Any:
    from pgbatch.workloads.collections.routes import router

    return router


WORKLOAD = Workload(
    name="collections",
    install=register_tasks,
    migrations_package="pgbatch.workloads.collections",
    router=_router,
    # Its copy statistics name batches: they go when the batch is pruned.
    prune_rows=prune_copy_stats,
)
