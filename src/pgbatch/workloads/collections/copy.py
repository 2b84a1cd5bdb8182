"""The collection-copy workload: copy part of a collection into another, deduplicated.

Users keep collections of items (companies, say) as rows of `collection_items
(collection_id, item_id)`, keyed by both. A copy of a source's items (all of them, or a
list) into a target is a pgbatch batch:

- **An item is a key range** of the source: `keys_per_item` keys (1,000 by default) in
  key order, cut server-side by one query, so a copy of a million associations sends a
  thousand (first, last) pairs through Python, not a million ids. A copy of a list has
  items of `keys_per_item` ids of the sorted, de-duplicated list.
- **A shard is `RANGES_PER_SHARD` items** (10, so 10,000 associations). Its handler does
  no copying itself: it queues one statement with `ctx.execute_at_commit`, which inserts
  the shard's keys into the target with `INSERT … ON CONFLICT DO NOTHING` and records
  how many were inserted and how many were already there, in the shard's completion
  transaction. The epoch fence therefore decides whether the copy happens: a worker whose
  lease was taken over writes nothing, and a shard counts its keys exactly once.
- **Progress is "x of n" ranges**, as for any batch: a million associations are 1,000
  items in 100 shards, so the bar moves in steps of 1 %. Smaller shards would move it in
  finer steps but pay the claim and commit overhead (a few ms) more often; larger ones
  make each retry redo more and each completion hold its locks longer.

"All" means the keys the source holds when the copy is submitted: the ranges are fixed
then (a key added later inside a range is copied too, one outside every range is not).
Collections are their tenant's (issue 9): every key starts with the tenant, a copy reads
and writes only its batch's tenant's collections (its statement takes the tenant from the
batch, not from the items), and another tenant's collection answers like a missing one.
The copy task is internal: the public batch route refuses it, so a copy always passes
submit_copy's checks there.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pgbatch.app import App
from pgbatch.engine.context import ShardContext
from pgbatch.errors import ConfigurationError, InvalidBatchError
from pgbatch.labels import MAX_NAME_CHARS
from pgbatch.models import Batch, BatchStatus, Item, Outcome, ok
from pgbatch.workloads.collections import queries

__all__ = [
    "ASSOCIATIONS_TOTAL_KEY",
    "KEYS_PER_ITEM",
    "RANGES_PER_SHARD",
    "TASK",
    "CollectionNotFoundError",
    "CopyReport",
    "add_items",
    "copy_collection_shard",
    "copy_report",
    "create_collection",
    "create_tables",
    "delete_collection",
    "register_tasks",
    "seed_items",
    "submit_copy",
    "submit_copy_or_find",
]

TASK = "pgbatch.collection_copy"
# Keys per item (one range): at ~6 µs per inserted key (EXPLAIN ANALYZE, docs/collections.md)
# a range is ~6 ms of database work, and a million keys make 1,000 ranges, few enough to
# submit in one statement.
KEYS_PER_ITEM = 1_000
# Items per shard: 10,000 keys, ~60 ms per completion against a few ms of per-shard
# overhead (docs/sizing.md), and 1 % steps of progress for a million keys.
RANGES_PER_SHARD = 10
# A range or an id list bigger than this would make one item (and its shard) huge.
MAX_KEYS_PER_ITEM = 100_000
# Collection ids and item ids are keys: a bound keeps the index entries small.
MAX_KEY_CHARS = 200

_OK = ok(None)
# The metadata key of a copy's batch that holds how many associations it covers.
ASSOCIATIONS_TOTAL_KEY = "associations_total"


class CollectionNotFoundError(InvalidBatchError):
    """The tenant has no collection of that name (another tenant's one reads the same)."""


@dataclass(frozen=True, slots=True)
class CopyReport:
    """What a copy did so far: its progress and the keys inserted and already present."""

    batch_id: int
    source: str | None  # None only for an empty copy (it has no items to tell)
    target: str | None
    status: BatchStatus
    ranges_done: int
    ranges_total: int
    inserted: int
    already_present: int
    not_in_source: int  # listed ids the source does not hold (0 for a copy of all)
    # Associations the copy covers: the source's keys at submit, or the listed ids (None
    # for a copy submitted before copies recorded it).
    associations_total: int | None = None

    @property
    def finished(self) -> bool:
        """Tell whether the copy has ended (its counts are then final)."""
        return self.status.is_final


def register_tasks(app: App, *, shard_size: int = RANGES_PER_SHARD) -> None:
    """Register the copy task on `app` (what `app.use(collections.WORKLOAD)` runs)."""
    if TASK in app.tasks:
        return
    # Internal: its items name collections, which only submit_copy checks against the tenant.
    app.task(TASK, shard_size=shard_size, internal=True)(copy_collection_shard)


async def create_tables(app: App) -> None:
    """Apply the workload's migrations now, for an app already open when it started using it."""
    await app.migrate()


async def copy_collection_shard(items: list[Item], ctx: ShardContext) -> list[Outcome]:
    """Queue the fenced statement that copies this shard's ranges (or ids) at commit."""
    first = items[0].value
    source, target = first["source"], first["target"]
    if any(i.value["source"] != source or i.value["target"] != target for i in items):
        raise ValueError("a shard of a copy mixes sources or targets")
    if "ids" in first:
        statement = queries.copy_ids_statement(
            batch_id=ctx.batch_id,
            shard_id=ctx.shard_id,
            source=source,
            target=target,
            item_ids=[key for item in items for key in item.value["ids"]],
        )
    else:
        statement = queries.copy_ranges_statement(
            batch_id=ctx.batch_id,
            shard_id=ctx.shard_id,
            source=source,
            target=target,
            ranges=[(item.value["first"], item.value["last"]) for item in items],
        )
    ctx.execute_at_commit(statement.statement, statement.params)
    return [_OK] * len(items)


async def submit_copy(
    app: App,
    *,
    source: str,
    target: str,
    item_ids: Sequence[str] | None,
    tenant: str = "default",
    idempotency_key: str | None = None,
    keys_per_item: int = KEYS_PER_ITEM,
    shard_size: int | None = None,
    priority: int = 0,
) -> Batch:
    """Submit a copy (the options of `submit_copy_or_find`); return its batch."""
    batch, _ = await submit_copy_or_find(
        app,
        source=source,
        target=target,
        item_ids=item_ids,
        tenant=tenant,
        idempotency_key=idempotency_key,
        keys_per_item=keys_per_item,
        shard_size=shard_size,
        priority=priority,
    )
    return batch


async def submit_copy_or_find(
    app: App,
    *,
    source: str,
    target: str,
    item_ids: Sequence[str] | None,
    tenant: str = "default",
    idempotency_key: str | None = None,
    keys_per_item: int = KEYS_PER_ITEM,
    shard_size: int | None = None,
    priority: int = 0,
) -> tuple[Batch, bool]:
    """Submit a copy of `item_ids` (None: all items) from `source` into `target`.

    Return the batch and whether this call created it (False: the idempotency key named
    the same copy, submitted before).

    Items are ranges of `keys_per_item` keys; a shard holds `shard_size` of them (the
    task's, RANGES_PER_SHARD, by default). Raise InvalidBatchError naming the field
    ("source", "target", "item_ids", "keys_per_item", ...) when the input is wrong;
    nothing is written then; CollectionNotFoundError (an InvalidBatchError) when `tenant`
    has no such source or target. A copy of an empty source is an empty batch, finished at
    once.
    """
    _check_key(source, "source")
    _check_key(target, "target")
    if source == target:
        raise InvalidBatchError("target must differ from source", field="target")
    if (
        isinstance(keys_per_item, bool)
        or not isinstance(keys_per_item, int)
        or not 0 < keys_per_item <= MAX_KEYS_PER_ITEM
    ):
        raise InvalidBatchError(
            f"keys_per_item must be an integer from 1 to {MAX_KEYS_PER_ITEM}",
            field="keys_per_item",
        )
    ids = None if item_ids is None else _sorted_ids(item_ids)
    if TASK not in app.tasks:
        raise ConfigurationError(
            "the collection-copy task is not registered: call "
            "app.use(pgbatch.workloads.collections.WORKLOAD) before the app opens"
        )
    await app.open()
    async with app.db.connection() as conn:
        existing = await queries.existing_collections(conn, tenant, [source, target])
        for name, collection in (("source", source), ("target", target)):
            if collection not in existing:
                raise CollectionNotFoundError(f"no collection {collection!r}", field=name)
        items: list[dict[str, Any]]
        if ids is None:
            ranges = await queries.plan_copy_ranges(
                conn, tenant, source, keys_per_range=keys_per_item
            )
            items = [
                {"source": source, "target": target, "first": first, "last": last}
                for first, last, _ in ranges
            ]
            associations = sum(keys for _, _, keys in ranges)
        else:
            items = [
                {"source": source, "target": target, "ids": ids[start : start + keys_per_item]}
                for start in range(0, len(ids), keys_per_item)
            ]
            associations = len(ids)
    # The copy labels its batch: lists and the dashboard show source → target, and the
    # total is fixed with the batch in its submit transaction (a range is only bounds).
    return await app.submit_or_find(
        TASK,
        items,
        shard_size=shard_size,
        idempotency_key=idempotency_key,
        priority=priority,
        tenant=tenant,
        name=f"copy {source} → {target}"[:MAX_NAME_CHARS],
        metadata={
            "source": source,
            "target": target,
            ASSOCIATIONS_TOTAL_KEY: str(associations),
        },
    )


async def copy_report(app: App, batch_id: int, *, tenant: str | None = None) -> CopyReport:
    """Return the copy's progress and counts (of `tenant`'s batch, when given)."""
    # The batch first: if it has ended, the counts read after it are complete.
    batch = await app.get_batch(batch_id, tenant=tenant)
    if batch.task != TASK:
        raise InvalidBatchError(
            f"batch {batch_id} is a {batch.task!r} batch, not a collection copy",
            field="batch_id",
        )
    async with app.db.connection() as conn:
        counts = await queries.copy_counts(conn, batch_id)
        endpoints = await queries.copy_endpoints(conn, batch_id)
    source, target = endpoints if endpoints is not None else (None, None)
    total = batch.metadata.get(ASSOCIATIONS_TOTAL_KEY)
    return CopyReport(
        batch_id=batch_id,
        source=source,
        target=target,
        status=batch.status,
        ranges_done=batch.items_done,
        ranges_total=batch.total_items,
        inserted=counts.inserted,
        already_present=counts.already_present,
        not_in_source=counts.not_in_source,
        associations_total=int(total) if total is not None and total.isdigit() else None,
    )


async def create_collection(
    app: App, collection_id: str, *, name: str | None = None, tenant: str = "default"
) -> bool:
    """Create `tenant`'s collection; return False if it already existed."""
    _check_key(collection_id, "collection_id")
    _check_key(tenant, "tenant")
    await app.open()
    async with app.db.connection() as conn:
        return await queries.create_collection(conn, tenant, collection_id, name=name)


async def delete_collection(app: App, collection_id: str, *, tenant: str = "default") -> bool:
    """Delete `tenant`'s collection and its items; return False if it had no such one."""
    await app.open()
    async with app.db.connection() as conn:
        return await queries.delete_collection(conn, tenant, collection_id)


async def add_items(
    app: App, collection_id: str, item_ids: Iterable[str], *, tenant: str = "default"
) -> int:
    """Add items to `tenant`'s collection (present ones are skipped); return how many were new."""
    ids = _sorted_ids(item_ids)
    await app.open()
    async with app.db.connection() as conn:
        if collection_id not in await queries.existing_collections(conn, tenant, [collection_id]):
            raise CollectionNotFoundError(f"no collection {collection_id!r}", field="collection_id")
        return await queries.add_collection_items(conn, tenant, collection_id, ids)


async def seed_items(
    app: App,
    collection_id: str,
    count: int,
    *,
    prefix: str = "company-",
    first: int = 0,
    tenant: str = "default",
) -> int:
    """Add `count` synthetic items `<prefix><n>` (n zero-padded) server-side, for demos."""
    if count < 0:
        raise InvalidBatchError("count must not be negative", field="count")
    await app.open()
    async with app.db.connection() as conn:
        return await queries.generate_collection_items(
            conn, tenant, collection_id, count, prefix=prefix, first=first
        )


def _check_key(value: object, field: str, what: str | None = None) -> None:
    what = what or field
    if not isinstance(value, str) or not value:
        raise InvalidBatchError(f"{what} must be a non-empty string", field=field)
    if len(value) > MAX_KEY_CHARS or "\x00" in value:
        raise InvalidBatchError(
            f"{what} must be at most {MAX_KEY_CHARS} characters, without NUL", field=field
        )


def _sorted_ids(item_ids: Iterable[str]) -> list[str]:
    if isinstance(item_ids, str | bytes) or not isinstance(item_ids, Iterable):
        raise InvalidBatchError("item_ids must be a list of strings, or None", field="item_ids")
    unique: set[str] = set()
    for item_id in item_ids:
        _check_key(item_id, "item_ids", "every item id")
        unique.add(item_id)
    if not unique:
        raise InvalidBatchError("item_ids is empty; pass None to copy every item", field="item_ids")
    # Python sorts str by code point, which is the byte order of UTF-8: the "C" collation
    # of the key columns, so each item's ids are a contiguous stretch of the index.
    return sorted(unique)
