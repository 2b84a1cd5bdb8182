"""The App: registers tasks and callbacks, submits and manages batches, runs workers."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import time
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import psycopg

from pgbatch.config import Settings
from pgbatch.db import batches as batch_queries
from pgbatch.db import fleet as fleet_queries
from pgbatch.db import metrics as metric_queries
from pgbatch.db.callbacks import callback_status
from pgbatch.db.database import Database, pool_wait_s, resolve_url
from pgbatch.db.migrations import Component, migrate, pending_migrations
from pgbatch.db.notify import PROGRESS_CHANNEL, progress_batch_id
from pgbatch.db.results import error_groups, list_results
from pgbatch.db.retention import (
    PruneHook,
    PruneReport,
    batch_exists,
    due_batches,
    prune_batches,
)
from pgbatch.db.sessions import session_timeouts
from pgbatch.engine.notifier import Notifier
from pgbatch.engine.waiters import BatchWaiters
from pgbatch.errors import InvalidBatchError, InvalidStateError, UnknownTaskError
from pgbatch.fleet import QueueState, WaitingReason, WorkerInfo
from pgbatch.labels import LabelChange, check_metadata, check_name, is_utf8
from pgbatch.limits import (
    MAX_LEASE_TTL_S,
    MAX_MAX_ATTEMPTS,
    MAX_RETENTION_S,
    MAX_SHARD_SIZE,
    MIN_LEASE_TTL_S,
)
from pgbatch.models import (
    Batch,
    BatchFilter,
    BatchInsight,
    ErrorGroup,
    MetricsSnapshot,
    Outcome,
    ShardFailure,
)
from pgbatch.services import ServiceKey
from pgbatch.tasks import (
    DEFAULT_LEASE_TTL_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SHARD_SIZE,
    ISOLATION_STRATEGIES,
    CallbackFn,
    CallbackSpec,
    Handler,
    IsolationStrategy,
    TaskSpec,
    check_registration,
)
from pgbatch.workload import Workload

if TYPE_CHECKING:
    from pgbatch.engine.worker import Worker

__all__ = ["DEFAULT_RETENTION", "App", "Retention"]

_S = TypeVar("_S")


class _Default(enum.Enum):
    RETENTION = "the app's retention_s setting"


# submit(retention_s=...) left out: the app's default (Settings.retention_s) applies.
DEFAULT_RETENTION = _Default.RETENTION
# Seconds to keep a finished batch, None to keep it forever, or the app's default.
Retention = float | None | Literal[_Default.RETENTION]

# Idempotency keys are client-chosen strings; a bound keeps the unique index small.
MAX_IDEMPOTENCY_KEY_CHARS = 200
# The tenant of library and CLI calls (and of the API without authentication).
DEFAULT_TENANT = "default"
# Results are read back in pages of this many rows, so memory stays flat.
RESULT_PAGE_ROWS = 10_000
# watch() shows at most this many snapshots a second, however often NOTIFY fires.
WATCH_MIN_INTERVAL_S = 0.1
# wait() re-reads the batch this often when no NOTIFY came (a lost notification, a
# listener reconnecting): the fallback, not the design.
WAIT_POLL_S = 1.0


class App:
    """A pgbatch application: the tasks it knows and the database it runs on."""

    def __init__(
        self,
        *,
        database_url: str | None = None,
        settings: Settings | None = None,
        auto_migrate: bool = True,
    ) -> None:
        self.settings = settings or Settings()
        if database_url is not None:
            self.settings = self.settings.model_copy(update={"database_url": database_url})
        self.auto_migrate = auto_migrate
        self.tasks: dict[str, TaskSpec] = {}
        self.callbacks: dict[str, CallbackSpec] = {}
        self._on_open: list[Callable[[App], Awaitable[None]]] = []
        self._workloads: dict[str, Workload] = {}
        self._services: dict[ServiceKey[Any], Any] = {}
        self._db: Database | None = None
        self._waiters: BatchWaiters | None = None
        self._open_lock = asyncio.Lock()

    # -- registration ----------------------------------------------------------------------

    def task(
        self,
        name: str | None = None,
        *,
        shard_size: int = DEFAULT_SHARD_SIZE,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        lease_ttl_s: float = DEFAULT_LEASE_TTL_S,
        timeout_s: float | None = None,
        queue: str = "default",
        internal: bool = False,
        isolate_poison: IsolationStrategy = "bisect",
    ) -> Callable[[Handler], Handler]:
        """Register an async handler `(items, ctx) -> outcomes` as a task.

        An `internal` task is one a workload submits after its own checks: the HTTP API
        refuses to submit it. `isolate_poison`: how a shard that raised and will not be
        retried is searched for its failing items, so that only they fail ("bisect",
        "per_item", or "off": the whole shard fails).
        """
        _check_options(shard_size, max_attempts, lease_ttl_s, queue)
        if isolate_poison not in ISOLATION_STRATEGIES:
            raise InvalidBatchError(
                f"isolate_poison must be one of {', '.join(ISOLATION_STRATEGIES)}",
                field="isolate_poison",
            )
        if timeout_s is not None and timeout_s <= 0:
            raise InvalidBatchError("timeout_s must be positive", field="timeout_s")

        def register(fn: Handler) -> Handler:
            task_name = name or fn.__name__
            check_registration("task", task_name, fn, self.tasks)
            self.tasks[task_name] = TaskSpec(
                task_name,
                fn,
                shard_size,
                max_attempts,
                lease_ttl_s,
                timeout_s,
                queue,
                internal,
                isolate_poison,
            )
            return fn

        return register

    def callback(self, name: str | None = None) -> Callable[[CallbackFn], CallbackFn]:
        """Register an async completion callback `(batch, ctx) -> None`."""

        def register(fn: CallbackFn) -> CallbackFn:
            callback_name = name or fn.__name__
            check_registration("callback", callback_name, fn, self.callbacks)
            self.callbacks[callback_name] = CallbackSpec(callback_name, fn)
            return fn

        return register

    def on_open(self, fn: Callable[[App], Awaitable[None]]) -> Callable[[App], Awaitable[None]]:
        """Register a hook run once the app is connected (e.g. to create the user's tables)."""
        self._on_open.append(fn)
        return fn

    def use(self, workload: Workload) -> None:
        """Install a workload: its tasks now, its migrations when the app opens (or at
        `app.migrate()`), its routes when the app is served. A second use changes nothing.
        """
        if workload.name in self._workloads:
            return
        # On an app already open, the workload's migrations wait for `await app.migrate()`.
        self._workloads[workload.name] = workload
        workload.install(self)

    @property
    def workloads(self) -> tuple[Workload, ...]:
        """Return the workloads this app uses, in the order they were installed."""
        return tuple(self._workloads.values())

    def provide(self, key: ServiceKey[_S], service: _S) -> None:
        """Offer `service` to the app's other workloads under `key` (pgbatch.services)."""
        self._services[key] = service

    def service(self, key: ServiceKey[_S]) -> _S | None:
        """Return what an installed workload provides under `key`, or None if none does."""
        found: _S | None = self._services.get(key)
        return found

    def _components(self) -> list[Component]:
        return [w.component for w in self._workloads.values() if w.component is not None]

    # -- connection ------------------------------------------------------------------------

    @property
    def db(self) -> Database:
        """Return the open database (call `await app.open()` first)."""
        if self._db is None:
            raise RuntimeError("the app is not open: call `await app.open()` first")
        return self._db

    async def open(self) -> None:
        """Connect (starting the embedded server if no URL is set) and apply migrations."""
        async with self._open_lock:
            if self._db is not None:
                return
            url = await asyncio.to_thread(resolve_url, self.settings)
            db = Database(
                url,
                max_size=self.settings.pool_max_size,
                connect_timeout_s=self.settings.connect_timeout_s,
                timeouts=session_timeouts(self.settings),
            )
            await db.open()
            if self.auto_migrate:
                async with db.connection() as conn:
                    await migrate(conn, components=self._components())
            self._db = db
            try:
                for hook in self._on_open:
                    await hook(self)
            except BaseException:
                self._db = None
                await db.close()
                raise

    async def close(self) -> None:
        """Close the pool (and the LISTEN connection of the app's waits)."""
        if self._waiters is not None:
            await self._waiters.close()
            self._waiters = None
        if self._db is not None:
            await self._db.close()
            self._db = None

    async def __aenter__(self) -> App:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    @contextlib.contextmanager
    def request_scope(pool_wait: float) -> Iterator[None]:
        """Run the block as an interactive request: connections are checked at checkout, and
        one waits at most `pool_wait` seconds for a free pooled connection.

        A busy pool then fails fast (PoolTimeout, an HTTP 503) instead of after the
        patient default that workers and the CLI keep.
        """
        token = pool_wait_s.set(pool_wait)
        try:
            yield
        finally:
            pool_wait_s.reset(token)

    async def migrate(self) -> list[int]:
        """Apply pending migrations, the app's workloads' too; return pgbatch's versions applied."""
        await self.open()
        async with self.db.connection() as conn:
            return await migrate(conn, components=self._components())

    async def pending_migrations(self) -> dict[str, list[int]]:
        """Return, per component (pgbatch, the app's workloads), the versions not applied."""
        await self.open()
        async with self.db.connection() as conn:
            return await pending_migrations(conn, self._components())

    # -- batches ---------------------------------------------------------------------------

    async def submit(
        self,
        task: str,
        items: Iterable[Any] | AsyncIterable[Any],
        *,
        shard_size: int | None = None,
        max_attempts: int | None = None,
        lease_ttl_s: float | None = None,
        priority: int = 0,
        queue: str | None = None,
        idempotency_key: str | None = None,
        on_complete: str | None = None,
        tenant: str = "default",
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retention_s: Retention = DEFAULT_RETENTION,
    ) -> Batch:
        """Store a batch of `items` for `task` and queue its shards; return the batch.

        Items are streamed, so any iterable works, including a generator of millions.
        With an idempotency key, a repeat of the same submission returns the same batch.
        `name` and `metadata` (string keys and values, pgbatch.labels' bounds) label it
        for people and for `list_batches` filters.
        `retention_s`: how long after it finishes the batch is pruned (None: never).
        """
        spec = self._batch_spec(
            task,
            items,
            shard_size=shard_size,
            max_attempts=max_attempts,
            lease_ttl_s=lease_ttl_s,
            priority=priority,
            queue=queue,
            idempotency_key=idempotency_key,
            on_complete=on_complete,
            tenant=tenant,
            name=name,
            metadata=metadata,
            retention_s=retention_s,
        )
        batch, _ = await self._submit_spec(spec, items)
        return batch

    async def submit_or_find(
        self,
        task: str,
        items: Iterable[Any] | AsyncIterable[Any],
        **options: Any,
    ) -> tuple[Batch, bool]:
        """Submit like `submit`; also tell whether this call created the batch.

        False means the idempotency key named an existing batch with the same payload.
        """
        spec = self._batch_spec(task, items, **_submit_options(options))
        return await self._submit_spec(spec, items)

    async def submit_in(
        self,
        conn: psycopg.AsyncConnection[Any],
        task: str,
        items: Iterable[Any] | AsyncIterable[Any],
        **options: Any,
    ) -> Batch:
        """Submit like `submit`, on `conn` and inside its open transaction.

        The batch commits, and becomes claimable, only with the caller's own writes: a
        workload that writes rows and the batch that processes them commits both or
        neither. No idempotency key here (a repeat would need its own transaction).
        """
        if options.get("idempotency_key") is not None:
            raise InvalidBatchError("submit_in takes no idempotency key", field="idempotency_key")
        spec = self._batch_spec(task, items, **_submit_options(options))
        result = await batch_queries.submit_batch(conn, spec, items)
        if result.batch is not None:
            return result.batch
        return await batch_queries.get_batch(conn, result.batch_id)

    async def _submit_spec(
        self, spec: batch_queries.BatchSpec, items: Iterable[Any] | AsyncIterable[Any]
    ) -> tuple[Batch, bool]:
        await self.open()
        async with self.db.connection() as conn:
            result = await batch_queries.submit_batch(conn, spec, items)
            if result.batch is not None:
                return result.batch, result.created
            return await batch_queries.get_batch(conn, result.batch_id), result.created

    def _batch_spec(
        self,
        task: str,
        items: object,
        *,
        shard_size: int | None,
        max_attempts: int | None,
        lease_ttl_s: float | None,
        priority: int,
        queue: str | None,
        idempotency_key: str | None,
        on_complete: str | None,
        tenant: str,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
        retention_s: Retention = DEFAULT_RETENTION,
    ) -> batch_queries.BatchSpec:
        spec = self.tasks.get(task)
        if spec is None:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(f"unknown task {task!r} (registered: {known})", field="task")
        if isinstance(items, str | bytes | Mapping) or not isinstance(
            items, Iterable | AsyncIterable
        ):
            raise InvalidBatchError(
                f"items must be an iterable of items, not {type(items).__name__}", field="items"
            )
        shard_size = spec.shard_size if shard_size is None else shard_size
        max_attempts = spec.max_attempts if max_attempts is None else max_attempts
        lease_ttl_s = spec.lease_ttl_s if lease_ttl_s is None else lease_ttl_s
        queue = spec.queue if queue is None else queue
        _check_options(shard_size, max_attempts, lease_ttl_s, queue)
        _check_priority(priority)
        if not isinstance(tenant, str) or not tenant:
            raise InvalidBatchError("tenant must be a non-empty string", field="tenant")
        if idempotency_key is not None and not (
            isinstance(idempotency_key, str)
            and 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS
        ):
            raise InvalidBatchError(
                f"idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} characters",
                field="idempotency_key",
            )
        if on_complete is not None and on_complete not in self.callbacks:
            known = ", ".join(sorted(self.callbacks)) or "none"
            raise InvalidBatchError(
                f"unknown callback {on_complete!r} (registered: {known})", field="on_complete"
            )
        if retention_s is DEFAULT_RETENTION:
            retention_s = self.settings.retention_s
        elif retention_s is not None and (
            isinstance(retention_s, bool)
            or not isinstance(retention_s, int | float)
            or not math.isfinite(retention_s)
            or not 0 <= retention_s <= MAX_RETENTION_S
        ):
            raise InvalidBatchError(
                f"retention_s must be from 0 to {MAX_RETENTION_S:.0f} seconds or null (keep "
                f"forever), got {retention_s!r}",
                field="retention_s",
            )
        return batch_queries.BatchSpec(
            retention_s=None if retention_s is None else float(retention_s),
            task=task,
            shard_size=shard_size,
            max_attempts=max_attempts,
            lease_ttl_s=float(lease_ttl_s),
            queue=queue,
            priority=priority,
            on_complete=on_complete,
            idempotency_key=idempotency_key,
            tenant=tenant,
            max_shard_bytes=self.settings.max_shard_bytes,
            name=check_name(name),
            metadata=check_metadata(metadata),
        )

    async def get_batch(self, batch_id: int, *, tenant: str | None = None) -> Batch:
        """Return the batch with its current counters (only `tenant`'s, when given)."""
        await self.open()
        async with self.db.connection() as conn:
            return await batch_queries.get_batch(conn, batch_id, tenant=tenant)

    async def get_batches(self, batch_ids: Sequence[int]) -> list[Batch]:
        """Return the batches with these ids, of any tenant (unknown ids are skipped)."""
        await self.open()
        async with self.db.connection() as conn:
            return await batch_queries.get_batches(conn, batch_ids)

    async def list_batches(
        self, where: BatchFilter | None = None, *, limit: int = 20
    ) -> list[Batch]:
        """Return the batches matching `where` (all by default), newest first."""
        await self.open()
        async with self.db.connection() as conn:
            return await batch_queries.list_batches(conn, where, limit=limit)

    async def insight(
        self, batch_id: int, *, tenant: str | None = None
    ) -> tuple[Batch, BatchInsight]:
        """Return the batch with its shard states, throughput over time and error samples."""
        await self.open()
        async with self.db.connection() as conn:
            batch = await batch_queries.get_batch(conn, batch_id, tenant=tenant)
            return batch, await batch_queries.batch_insight(conn, batch)

    async def error_groups(
        self, batch_id: int, *, tenant: str | None = None, limit: int = 20, samples: int = 3
    ) -> tuple[Batch, list[ErrorGroup], int]:
        """Return the batch, its failed items grouped by error (largest first, `samples`
        items of each with their input) and the number of groups."""
        await self.open()
        async with self.db.connection() as conn:
            batch = await batch_queries.get_batch(conn, batch_id, tenant=tenant)
            groups, total = await error_groups(conn, batch_id, limit=limit, samples=samples)
        return batch, groups, total

    async def last_failure(
        self, batch_id: int, *, tenant: str | None = None
    ) -> tuple[Batch, ShardFailure | None]:
        """Return the batch and its most recent shard failure on record, with its traceback."""
        await self.open()
        async with self.db.connection() as conn:
            batch = await batch_queries.get_batch(conn, batch_id, tenant=tenant)
            return batch, await batch_queries.last_shard_failure(conn, batch_id)

    async def cancel(
        self, batch_id: int, *, expected_version: int | None = None, tenant: str | None = None
    ) -> bool:
        """Cancel the batch; return False if it had already ended."""
        await self.open()

        async def work(conn: psycopg.AsyncConnection[Any]) -> bool:
            return await batch_queries.cancel_batch(
                conn, batch_id, expected_version=expected_version, tenant=tenant
            )

        return await self.db.run_in_transaction(work)

    async def update(
        self,
        batch_id: int,
        *,
        priority: int | None = None,
        cancel: bool = False,
        labels: LabelChange | None = None,
        expected_version: int | None = None,
        tenant: str | None = None,
    ) -> Batch:
        """Change the labels, the priority and/or cancel, in one transaction against one
        version.

        Raises InvalidStateError when cancelling a batch that has already ended.
        """
        if priority is not None:
            _check_priority(priority)
        labels = None if labels is None else labels.checked()
        await self.open()

        async def work(conn: psycopg.AsyncConnection[Any]) -> Batch:
            # The first change checks the version; it moves it, so the next ones do not.
            checked = expected_version
            if labels is not None:
                await batch_queries.set_labels(
                    conn, batch_id, labels, expected_version=checked, tenant=tenant
                )
                checked = None
            if priority is not None:
                await batch_queries.set_priority(
                    conn, batch_id, priority, expected_version=checked, tenant=tenant
                )
                checked = None
            if cancel:
                if not await batch_queries.cancel_batch(
                    conn, batch_id, expected_version=checked, tenant=tenant
                ):
                    raise InvalidStateError(f"batch {batch_id} has already ended")
            return await batch_queries.get_batch(conn, batch_id, tenant=tenant)

        return await self.db.run_in_transaction(work)

    async def retry(
        self, batch_id: int, *, expected_version: int | None = None, tenant: str | None = None
    ) -> int:
        """Re-queue the batch's dead shards and shards with failed items; return how many."""
        await self.open()

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            return await batch_queries.requeue_failed(
                conn, batch_id, expected_version=expected_version, tenant=tenant
            )

        return await self.db.run_in_transaction(work)

    async def set_priority(
        self,
        batch_id: int,
        priority: int,
        *,
        expected_version: int | None = None,
        tenant: str | None = None,
    ) -> int:
        """Change the batch's priority; return its new version."""
        _check_priority(priority)
        await self.open()

        async def work(conn: psycopg.AsyncConnection[Any]) -> int:
            return await batch_queries.set_priority(
                conn, batch_id, priority, expected_version=expected_version, tenant=tenant
            )

        return await self.db.run_in_transaction(work)

    async def results(
        self, batch_id: int, *, errors_only: bool = False, tenant: str | None = None
    ) -> AsyncIterator[tuple[int, Outcome]]:
        """Yield (seq, outcome) for the batch's items in order, a page at a time."""
        await self.open()
        # Raises BatchNotFoundError before the first page for an unknown (or foreign) batch.
        batch = await self.get_batch(batch_id, tenant=tenant)
        # A page reads whole result blocks (one per shard): a page of at least a shard's
        # items reads each block at most twice, however large the shards.
        page_rows = max(RESULT_PAGE_ROWS, batch.shard_size)
        after = -1
        while True:
            async with self.db.connection() as conn:
                rows = await list_results(
                    conn,
                    batch_id,
                    after_seq=after,
                    limit=page_rows,
                    errors_only=errors_only,
                )
                # After the page, not before: a batch pruned while this page was read
                # loses its row first, so a page read before that commit is whole, and
                # one read after it (maybe short) ends the stream with an error here,
                # never as a silently short result set.
                if not await batch_exists(conn, batch_id):
                    raise await batch_queries.missing_batch(conn, batch_id, tenant=tenant)
            for row in rows:
                yield row
            if len(rows) < page_rows:
                return
            after = rows[-1][0]

    @contextlib.asynccontextmanager
    async def progress_notifications(
        self,
        on_change: Callable[[int], None],
        *,
        on_connect: Callable[[], None] | None = None,
        listening: asyncio.Event | None = None,
    ) -> AsyncIterator[None]:
        """Call `on_change(batch_id)` for every change of a batch while the block runs.

        The calls come from NOTIFY on a LISTEN connection of its own. `on_connect` runs after
        each (re)connect of it: what was sent while it was down is lost, so look at the
        batches once. `listening` is set while the LISTEN is in place (a test signal).
        """
        await self.open()

        def on_notify(channel: str, payload: str) -> None:
            batch_id = progress_batch_id(payload)
            if batch_id is not None:
                on_change(batch_id)

        notifier = Notifier(
            self.db, [PROGRESS_CHANNEL], on_notify, on_connect=on_connect, listening=listening
        )
        notifier.start()
        try:
            yield
        finally:
            await notifier.stop()

    async def watch(self, batch_id: int, *, poll_interval_s: float = 1.0) -> AsyncIterator[Batch]:
        """Yield snapshots of the batch as it progresses (driven by NOTIFY); end when it ends.

        A lost connection is not an error here: the watch polls until the database is back.
        """
        changed = asyncio.Event()

        def on_change(changed_id: int) -> None:
            if changed_id == batch_id:
                changed.set()

        async with self.progress_notifications(on_change, on_connect=changed.set):
            last_shown = 0.0
            while True:
                try:
                    batch = await self.get_batch(batch_id)
                except psycopg.OperationalError:
                    await asyncio.sleep(poll_interval_s)
                    continue
                yield batch
                if batch.is_final:
                    return
                # Polling is the fallback; a NOTIFY normally ends this wait early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), poll_interval_s)
                changed.clear()
                pause = WATCH_MIN_INTERVAL_S - (time.monotonic() - last_shown)
                if pause > 0:
                    await asyncio.sleep(pause)
                last_shown = time.monotonic()

    async def wait(
        self, batch_id: int, *, timeout_s: float | None = None, callbacks: bool = False
    ) -> Batch:
        """Wait until the batch ends and return it; with `callbacks`, until its completion
        callback has run too (or was given up).

        Woken by the batch's own NOTIFY on a LISTEN connection the app's waits share, so a
        wait costs one read of the batch per change, not a connection.
        """
        await self.open()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        if self._waiters is None:
            self._waiters = BatchWaiters(self.db, listen_timeout_s=self.settings.connect_timeout_s)
        async with self._waiters.subscribe(batch_id) as changed:
            while True:
                changed.clear()
                try:
                    batch = await self.get_batch(batch_id)
                    if batch.is_final and (not callbacks or await self._callback_settled(batch)):
                        return batch
                except psycopg.OperationalError:
                    pass  # the database is away: polled again below
                wait_s = WAIT_POLL_S
                if deadline is not None:
                    wait_s = min(wait_s, deadline - time.monotonic())
                    if wait_s <= 0:
                        raise TimeoutError(f"batch {batch_id} did not finish within {timeout_s} s")
                # Polling is the fallback; the batch's NOTIFY normally ends this wait early.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), wait_s)

    async def _callback_settled(self, batch: Batch) -> bool:
        """Tell whether the completion callback of the batch's run is done or given up."""
        if batch.on_complete is None:
            return True
        async with self.db.connection() as conn:
            status = await callback_status(conn, batch.id, batch.run_no)
        # No row: the run queued none (the row is written with the batch's end, or never).
        return status in (None, "done", "dead")

    # -- operations ------------------------------------------------------------------------

    async def metrics_snapshot(self) -> MetricsSnapshot:
        """Return the database's view of all work (every tenant's): what /metrics exports."""
        await self.open()
        async with self.db.connection() as conn:
            return await metric_queries.metrics_snapshot(conn)

    # -- the fleet: workers and queues (issue 12 §2) -----------------------------------------

    async def workers(self, *, tenant: str | None = DEFAULT_TENANT) -> list[WorkerInfo]:
        """Return the worker registry; each worker's running batches are `tenant`'s only.

        `tenant=None` shows every tenant's running batches (operators: the CLI).
        """
        await self.open()
        async with self.db.connection() as conn:
            return await fleet_queries.list_workers(conn, tenant=tenant)

    async def queues(self, *, tenant: str | None = DEFAULT_TENANT) -> list[QueueState]:
        """Return every queue, paused or not, with `tenant`'s depth (None: every tenant's)."""
        await self.open()
        async with self.db.connection() as conn:
            return await fleet_queries.list_queues(conn, tenant=tenant)

    async def pause_queue(self, queue: str, *, paused_by: str = DEFAULT_TENANT) -> None:
        """Stop every worker claiming from `queue`; shards already running still finish."""
        _check_queue_name(queue)
        await self.open()
        async with self.db.connection() as conn:
            await fleet_queries.pause_queue(conn, queue, paused_by=paused_by)

    async def resume_queue(self, queue: str) -> bool:
        """Let workers claim from `queue` again (woken at once); False if it was not paused."""
        _check_queue_name(queue)
        await self.open()
        async with self.db.connection() as conn:
            return await fleet_queries.resume_queue(conn, queue)

    async def waiting_reasons(self, batches: Sequence[Batch]) -> dict[int, WaitingReason]:
        """Return why each unfinished batch waits (paused queue, no live worker), if it does."""
        waiting = [(b.id, b.queue, b.task) for b in batches if not b.is_final]
        if not waiting:
            return {}
        await self.open()
        async with self.db.connection() as conn:
            return await fleet_queries.batch_waiting_reasons(conn, waiting)

    # -- retention -------------------------------------------------------------------------

    async def due_for_pruning(
        self, *, finished_before: datetime | None = None, limit: int = 1000
    ) -> list[Batch]:
        """Return the final batches a prune would remove now (what `--dry-run` lists)."""
        await self.open()
        async with self.db.connection() as conn:
            ids = await due_batches(conn, finished_before=finished_before, limit=limit)
            return await batch_queries.get_batches(conn, ids)

    async def prune(
        self,
        *,
        finished_before: datetime | None = None,
        limit: int | None = None,
        extra_hooks: Sequence[PruneHook] = (),
    ) -> PruneReport:
        """Remove final batches past their retention (or finished before `finished_before`).

        Never touches a batch that is not final. Safe to run beside workers and other
        pruners; a batch whose lock is busy is left for a later pass (report.busy). The
        workloads this app uses delete their own rows of each batch; `extra_hooks` adds
        others' (the CLI adds the shipped workloads').
        """
        await self.open()
        hooks = [w.prune_rows for w in self.workloads if w.prune_rows is not None]
        hooks += [hook for hook in extra_hooks if hook not in hooks]
        async with self.db.connection() as conn:
            return await prune_batches(
                conn,
                finished_before=finished_before,
                limit=limit or self.settings.retention_batches_per_pass,
                hooks=hooks,
                chunk_rows=self.settings.retention_chunk_rows,
                lock_timeout_ms=self.settings.retention_lock_timeout_ms,
            )

    # -- workers ---------------------------------------------------------------------------

    def worker(self, *, concurrency: int = 32, queues: list[str] | None = None) -> Worker:
        """Return a Worker for this app (call `await worker.run()`)."""
        # Imported here: the worker module imports this one.
        from pgbatch.engine.worker import Worker

        for queue in queues or ():
            _check_queue_name(queue)
        return Worker(self, concurrency=concurrency, queues=queues)


_SUBMIT_OPTIONS = (
    "shard_size",
    "max_attempts",
    "lease_ttl_s",
    "priority",
    "queue",
    "idempotency_key",
    "on_complete",
    "tenant",
    "name",
    "metadata",
    "retention_s",
)


def _submit_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(options) - set(_SUBMIT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown submit options: {', '.join(sorted(unknown))}")
    defaults: dict[str, Any] = {name: None for name in _SUBMIT_OPTIONS}
    defaults.update(priority=0, tenant="default", retention_s=DEFAULT_RETENTION)
    return {**defaults, **options}


def _check_priority(priority: object) -> None:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidBatchError("priority must be an integer", field="priority")
    if not -(2**31) <= priority < 2**31:
        raise InvalidBatchError("priority must fit in 32 bits", field="priority")


def _check_options(
    shard_size: object, max_attempts: object, lease_ttl_s: object, queue: object
) -> None:
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= 0:
        raise InvalidBatchError(
            f"shard_size must be a positive integer, got {shard_size!r}", field="shard_size"
        )
    if shard_size > MAX_SHARD_SIZE:
        raise InvalidBatchError(f"shard_size must be at most {MAX_SHARD_SIZE}", field="shard_size")
    if (
        isinstance(max_attempts, bool)
        or not isinstance(max_attempts, int)
        or not 1 <= max_attempts <= MAX_MAX_ATTEMPTS
    ):
        raise InvalidBatchError(
            f"max_attempts must be an integer from 1 to {MAX_MAX_ATTEMPTS}, got {max_attempts!r}",
            field="max_attempts",
        )
    if (
        isinstance(lease_ttl_s, bool)
        or not isinstance(lease_ttl_s, int | float)
        or not MIN_LEASE_TTL_S <= lease_ttl_s <= MAX_LEASE_TTL_S
    ):
        raise InvalidBatchError(
            f"lease_ttl_s must be from {MIN_LEASE_TTL_S} to {MAX_LEASE_TTL_S:.0f} seconds, "
            f"got {lease_ttl_s!r}",
            field="lease_ttl_s",
        )
    if not isinstance(queue, str) or not queue:
        raise InvalidBatchError("queue must be a non-empty string", field="queue")
    try:
        _check_queue_name(queue)
    except ValueError as exc:
        # A queue no claim can name (a NUL, not UTF-8) would fail every claim of its worker.
        raise InvalidBatchError(str(exc), field="queue") from None


# A queue name as batches carry it (the API's submit allows 1-200 characters, no NUL).
MAX_QUEUE_NAME_CHARS = 200


def _check_queue_name(queue: str) -> None:
    if not queue or len(queue) > MAX_QUEUE_NAME_CHARS or "\x00" in queue or not is_utf8(queue):
        raise ValueError(
            f"a queue name has 1 to {MAX_QUEUE_NAME_CHARS} characters, no NUL, valid UTF-8"
        )
