"""Live progress for Server-Sent Events: one LISTEN per API process, fanned out to clients.

Every client stream subscribes here; none polls the database. A pump task turns the
`pgbatch_progress` notifications into one read of all changed batches at most every
`min_interval_s`, so a batch yields at most a few events a second however fast its
shards finish and however many clients watch it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import psycopg

from pgbatch.app import App
from pgbatch.models import Batch

__all__ = ["HubClosedError", "ProgressHub", "Subscription", "progress_key"]

_log = logging.getLogger(__name__)

# A lost notification (the LISTEN connection dropped and came back) is covered by
# re-reading every watched batch this often.
FALLBACK_POLL_S = 5.0


def progress_key(batch: Batch) -> tuple[int, int, int]:
    """Return a key that grows with every change of the batch (the SSE event id).

    `version` moves on status changes, retries and client updates; within one version the
    counters only grow.
    """
    return (batch.version, batch.shards_done, batch.items_done)


class HubClosedError(Exception):
    """The server is shutting down; streams end."""


class Subscription:
    """One client stream's mailbox: the latest snapshot of each batch it watches."""

    def __init__(self, tenant: str, batch_id: int | None) -> None:
        self.tenant = tenant
        self.batch_id = batch_id  # None: every batch of the tenant
        self._pending: dict[int, Batch] = {}
        self._ready = asyncio.Event()
        self._closed = False

    def offer(self, batch: Batch) -> None:
        """Keep the newest snapshot (older unsent ones are superseded) and wake the reader."""
        self._pending[batch.id] = batch
        self._ready.set()

    def close(self) -> None:
        """End the stream."""
        self._closed = True
        self._ready.set()

    async def next(self, timeout_s: float) -> list[Batch]:
        """Return the snapshots that arrived (empty after `timeout_s` with none)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        if self._closed:
            raise HubClosedError
        self._ready.clear()
        batches = list(self._pending.values())
        self._pending.clear()
        return batches


class ProgressHub:
    """Turn NOTIFY into batch snapshots for the subscribed streams of one process."""

    def __init__(self, app: App, *, min_interval_s: float) -> None:
        self._app = app
        self._min_interval_s = min_interval_s
        self._by_batch: dict[int, set[Subscription]] = {}
        self._by_tenant: dict[str, set[Subscription]] = {}
        self._dirty: set[int] = set()
        self._wake = asyncio.Event()
        self._listener = contextlib.AsyncExitStack()
        self._pump_task: asyncio.Task[None] | None = None
        self.listening = asyncio.Event()
        self.reads = 0  # batch reads done for subscribers (a test looks at it)

    async def start(self) -> None:
        """Start listening and pumping."""
        await self._listener.enter_async_context(
            self._app.progress_notifications(
                self._on_change, on_connect=self._on_connect, listening=self.listening
            )
        )
        self._pump_task = asyncio.create_task(self._pump(), name="pgbatch-sse-pump")

    async def close(self) -> None:
        """End every stream and stop."""
        for subs in [*self._by_batch.values(), *self._by_tenant.values()]:
            for sub in subs:
                sub.close()
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
        await self._listener.aclose()

    @property
    def subscribers(self) -> int:
        """Count the open streams."""
        return sum(len(s) for s in self._by_batch.values()) + sum(
            len(s) for s in self._by_tenant.values()
        )

    def subscribe(self, tenant: str, batch_id: int | None) -> Subscription:
        """Open a mailbox for one batch, or for every batch of `tenant` (batch_id None)."""
        sub = Subscription(tenant, batch_id)
        if batch_id is None:
            self._by_tenant.setdefault(tenant, set()).add(sub)
        else:
            self._by_batch.setdefault(batch_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Close a mailbox."""
        if sub.batch_id is None:
            _discard(self._by_tenant, sub.tenant, sub)
        else:
            _discard(self._by_batch, sub.batch_id, sub)

    def _on_change(self, batch_id: int) -> None:
        if batch_id in self._by_batch or self._by_tenant:
            self._dirty.add(batch_id)
            self._wake.set()

    def _on_connect(self) -> None:
        # Whatever was notified while nobody listened is lost: look at every watched batch.
        self._dirty.update(self._by_batch)
        self._wake.set()

    async def _pump(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FALLBACK_POLL_S)
            self._wake.clear()
            if not self._dirty:
                self._dirty.update(self._by_batch)  # the fallback poll
            dirty, self._dirty = self._dirty, set()
            if dirty:
                try:
                    await self._publish(sorted(dirty))
                except psycopg.Error as exc:
                    _log.warning("progress read failed (%s); retrying", exc)
                    self._dirty.update(dirty)
            # The throttle: changes that arrive meanwhile are read together next round.
            await asyncio.sleep(self._min_interval_s)

    async def _publish(self, batch_ids: list[int]) -> None:
        batches = await self._app.get_batches(batch_ids)
        self.reads += 1
        for batch in batches:
            for sub in list(self._by_batch.get(batch.id, ())):
                if sub.tenant == batch.tenant:
                    sub.offer(batch)
            for sub in list(self._by_tenant.get(batch.tenant, ())):
                sub.offer(batch)


def _discard(index: dict[Any, set[Subscription]], key: object, sub: Subscription) -> None:
    subs = index.get(key)
    if subs is not None:
        subs.discard(sub)
        if not subs:
            del index[key]
