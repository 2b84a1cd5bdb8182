"""One LISTEN connection per app for every `app.wait()`: a waiter costs an event, not a socket."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator

from pgbatch.db.database import Database
from pgbatch.db.notify import PROGRESS_CHANNEL, progress_batch_id
from pgbatch.engine.notifier import Notifier

__all__ = ["BatchWaiters"]


class BatchWaiters:
    """Wake the waiters of a batch when a progress notification names it.

    Each `app.wait()` used to open its own LISTEN connection (a connect and a LISTEN round
    trip per call) and re-read the batch at most every 0.1 s; here one connection, opened at
    the first wait, serves every wait of the app until it closes.
    """

    def __init__(self, db: Database, *, listen_timeout_s: float) -> None:
        self._events: defaultdict[int, set[asyncio.Event]] = defaultdict(set)
        self._listening = asyncio.Event()
        # A wait gives the LISTEN this long to be in place, then goes on polling.
        self._listen_timeout_s = listen_timeout_s
        self._notifier = Notifier(
            db,
            [PROGRESS_CHANNEL],
            self._on_notify,
            on_connect=self._wake_all,
            listening=self._listening,
        )

    @contextlib.asynccontextmanager
    async def subscribe(self, batch_id: int) -> AsyncIterator[asyncio.Event]:
        """Yield an event set whenever the batch changes (or the listener reconnects).

        Once the block is entered the LISTEN is in place (unless the database is away), so
        a change after the caller's next read of the batch is never missed.
        """
        event = asyncio.Event()
        self._events[batch_id].add(event)
        try:
            self._notifier.start()
            if not self._listening.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._listening.wait(), self._listen_timeout_s)
            yield event
        finally:
            waiting = self._events.get(batch_id)
            if waiting is not None:
                waiting.discard(event)
                if not waiting:
                    del self._events[batch_id]

    async def close(self) -> None:
        """Stop listening and close the connection."""
        await self._notifier.stop()
        self._wake_all()

    def _on_notify(self, channel: str, payload: str) -> None:
        batch_id = progress_batch_id(payload)
        for event in self._events.get(batch_id, ()) if batch_id is not None else ():
            event.set()

    def _wake_all(self) -> None:
        # After a (re)connect, what was sent meanwhile is lost: every waiter looks again.
        for events in self._events.values():
            for event in events:
                event.set()
