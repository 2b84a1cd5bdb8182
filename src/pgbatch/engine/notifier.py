"""A LISTEN connection of its own: turns NOTIFY into callbacks, reconnecting when it drops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from pgbatch.db.database import Database
from pgbatch.db.notify import listen

__all__ = ["Notifier"]

_log = logging.getLogger(__name__)

# Reconnect backoff of the LISTEN connection; callers poll meanwhile.
RECONNECT_DELAY_S = 1.0


class Notifier:
    """Listen on `channels` and call `on_notify(channel, payload)` for each notification."""

    def __init__(
        self,
        db: Database,
        channels: Sequence[str],
        on_notify: Callable[[str, str], None],
        *,
        on_connect: Callable[[], None] | None = None,
        listening: asyncio.Event | None = None,
    ) -> None:
        self._db = db
        self._channels = list(channels)
        self._on_notify = on_notify
        # Called after every (re)connect: what was sent while nobody listened is lost,
        # so the owner should look at the database once.
        self._on_connect = on_connect
        # Test signal: the LISTEN is in place (an owner may pass its own event).
        self.listening = listening or asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start listening in the background."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="pgbatch-notifier")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            conn: psycopg.AsyncConnection[Any] | None = None
            try:
                conn = await self._db.connect_dedicated()
                await listen(conn, self._channels)
                self.listening.set()
                if self._on_connect:
                    self._on_connect()
                async for notify in conn.notifies():
                    self._on_notify(notify.channel, notify.payload)
            except psycopg.Error as exc:
                self.listening.clear()
                _log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                await asyncio.sleep(RECONNECT_DELAY_S)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
