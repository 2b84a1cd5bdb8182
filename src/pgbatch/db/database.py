"""The connection pool, and a transaction helper that retries deadlocks and serialization errors."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any, TypeVar

import orjson
import psycopg
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.types.json import set_json_loads
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

from pgbatch.config import Settings
from pgbatch.db.embedded import embedded_exists, embedded_log_path, embedded_url
from pgbatch.db.sessions import SessionTimeouts, apply_session_timeouts
from pgbatch.errors import ConfigurationError

__all__ = ["Database", "describe_database", "pool_wait_s", "resolve_url"]

_log = logging.getLogger(__name__)

T = TypeVar("T")

# Deadlocks and serialization failures are retried this many times (invariant 6)...
TX_RETRY_ATTEMPTS = 8
# ...with full-jitter backoff starting here and doubling; a few ms is the time a
# competing transaction in this engine needs to commit.
TX_RETRY_BASE_S = 0.005
TX_RETRY_MAX_S = 0.5

RETRYABLE_ERRORS = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)


def describe_database(settings: Settings) -> str:
    """Return one line naming the database the settings point at (no password shown)."""
    if settings.database_url:
        return f"database: {_without_password(settings.database_url)} (DATABASE_URL)"
    data_dir = settings.data_dir.expanduser().resolve()
    fresh = "" if embedded_exists(data_dir) else ", created now"
    return (
        f"database: embedded PostgreSQL in {data_dir}{fresh} "
        f"(start-up log: {embedded_log_path(data_dir)}; set DATABASE_URL for another server)"
    )


def _without_password(url: str) -> str:
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(a DATABASE_URL that does not parse)"
    if "password" in params:
        params["password"] = "***"
    host = str(params.get("host", ""))
    if not host or host.startswith("/"):
        where = f"the socket in {host}" if host else "the local socket"
    else:
        where = f"{host}:{params.get('port', 5432)}"
    return f"{params.get('dbname', params.get('user', ''))} on {where}"


def resolve_url(settings: Settings) -> str:
    """Return the URL to use: DATABASE_URL if set, else the embedded server's."""
    if settings.database_url:
        return settings.database_url
    return embedded_url(settings.data_dir)


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    # Items and results are parsed on the hot path; orjson is several times faster.
    set_json_loads(orjson.loads, conn)


# -- pool waits and reconnection (issue 9, items 5 and 13) -----------------------------------
# How long the current task waits for a pooled connection; None is the pool's default
# (30 s). The API sets it per request so a busy pool answers 503 within seconds, while
# workers and the CLI keep the patient default.
pool_wait_s: ContextVar[float | None] = ContextVar("pgbatch_pool_wait_s", default=None)

# After a lost connection the pool tries again after this long, then backs off to at most
# POOL_RECONNECT_MAX_S: psycopg_pool's 1, 2, 4 s... left the API failing for up to 7.5 s
# after a restarted server was back, and one failed attempt costs only a refused connect.
POOL_RECONNECT_FIRST_S = 0.1
POOL_RECONNECT_MAX_S = 0.5


class _QuickReconnect(AttemptWithBackoff):
    """psycopg_pool's reconnection backoff, started short and capped."""

    INITIAL_DELAY = POOL_RECONNECT_FIRST_S

    def update_delay(self, now: float) -> None:
        """Compute the next delay as psycopg_pool does, then cap it."""
        super().update_delay(now)
        self.delay = min(self.delay, POOL_RECONNECT_MAX_S)


class _Pool(AsyncConnectionPool[psycopg.AsyncConnection[Any]]):
    """The pool, reconnecting with `_QuickReconnect` (psycopg_pool has no option for it)."""

    async def _add_connection(
        self, attempt: AttemptWithBackoff | None, growing: bool = False
    ) -> None:
        await super()._add_connection(
            attempt or _QuickReconnect(timeout=self.reconnect_timeout), growing
        )


async def _check_for_api_requests(conn: psycopg.AsyncConnection[Any]) -> None:
    """Check a connection at checkout for an API request (one that set `pool_wait_s`).

    A connection the server dropped (restart, idle kill) is then found and replaced for
    one round trip instead of failing the request that drew it. Workers skip it: a round
    trip per claim and per flush would cost their throughput, and they retry anyway.
    """
    if pool_wait_s.get() is not None:
        await AsyncConnectionPool.check_connection(conn)


# -- end of pool waits and reconnection ------------------------------------------------------


class Database:
    """Own the pool of one process; every query of the engine goes through it."""

    def __init__(
        self,
        url: str,
        *,
        max_size: int = 6,
        min_size: int = 1,
        connect_timeout_s: float = 10.0,
        timeouts: SessionTimeouts | None = None,
    ) -> None:
        self.url = url
        self.connect_timeout_s = connect_timeout_s
        self.timeouts = timeouts or SessionTimeouts()
        self.pool: AsyncConnectionPool[psycopg.AsyncConnection[Any]] = _Pool(
            url,
            min_size=min_size,
            max_size=max_size,
            open=False,
            configure=self._configure_session,
            kwargs={"autocommit": True, **self.timeouts.connect_kwargs(url)},
            name="pgbatch",
            check=_check_for_api_requests,
        )
        self.tx_retries = 0

    async def open(self) -> None:
        """Open the pool and check that the server answers."""
        try:
            # One direct connection first: a wrong URL fails at once with the server's own
            # reason, where the pool would retry quietly until its timeout.
            probe = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(1, round(self.connect_timeout_s))
            )
            await probe.close()
            await self.pool.open(wait=True, timeout=self.connect_timeout_s)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot connect to PostgreSQL: {exc}. Check DATABASE_URL "
                "(or unset it to use the embedded server)"
            ) from exc

    async def close(self) -> None:
        """Close every connection."""
        await self.pool.close()

    async def __aenter__(self) -> Database:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """Lend a pooled connection in autocommit mode."""
        async with self.pool.connection(timeout=pool_wait_s.get()) as conn:
            yield conn

    async def connect_dedicated(self) -> psycopg.AsyncConnection[Any]:
        """Open a connection outside the pool (LISTEN needs one that nobody else uses)."""
        conn = await psycopg.AsyncConnection.connect(
            self.url, autocommit=True, **self.timeouts.connect_kwargs(self.url)
        )
        await self._configure_session(conn)
        return conn

    async def run_in_transaction(
        self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
    ) -> T:
        """Run `work` in one transaction, retrying deadlocks and serialization failures.

        `work` may run more than once, so it must not keep state between attempts.
        """
        return await self._run_retrying(work, transaction=True)

    async def run_autocommit(
        self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]
    ) -> T:
        """Run `work` on an autocommit connection, retrying like `run_in_transaction`.

        Each statement of `work` is its own implicit transaction: no BEGIN and COMMIT
        round trips, for work that is one statement or whose statements stand alone.
        """
        return await self._run_retrying(work, transaction=False)

    async def _run_retrying(
        self, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]], *, transaction: bool
    ) -> T:
        for attempt in range(1, TX_RETRY_ATTEMPTS + 1):
            try:
                async with self.pool.connection(timeout=pool_wait_s.get()) as conn:
                    if not transaction:
                        return await work(conn)
                    async with conn.transaction():
                        return await work(conn)
            except RETRYABLE_ERRORS as exc:
                if attempt == TX_RETRY_ATTEMPTS:
                    raise
                self.tx_retries += 1
                delay = random.uniform(0, min(TX_RETRY_MAX_S, TX_RETRY_BASE_S * 2**attempt))
                _log.info("retrying transaction after %s (attempt %d)", type(exc).__name__, attempt)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    # -- session timeouts (issue 9: no session can wedge others, invariant 7) ---------------

    async def _configure_session(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Prepare a new connection: JSON parsing, then the session timeouts."""
        await _configure(conn)
        await apply_session_timeouts(conn, self.timeouts)
