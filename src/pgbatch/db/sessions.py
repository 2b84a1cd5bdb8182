"""Session timeouts on every pgbatch connection, and which database errors are transient.

A stalled client (a frozen process, a half-open TCP session) must hold its locks for a
bounded time only (invariant 7): every connection pgbatch opens sets a lock timeout, an
idle-in-transaction timeout and TCP keepalives, all below the shortest sensible lease.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from pgbatch.config import Settings
from pgbatch.db.queries import query

__all__ = [
    "TRANSIENT_SQLSTATES",
    "SessionTimeouts",
    "apply_session_timeouts",
    "is_transient",
    "session_timeouts",
]

# SQLSTATEs that say "the infrastructure hiccupped, the same work may succeed if rerun":
# a lost or refused connection (class 08), a server shutting down or restarting
# (57P01-57P03), too many connections (53300), a lock wait or an idle transaction that
# ran out of time (55P03, 25P03), and the retryable concurrency failures (40001, 40P01).
TRANSIENT_SQLSTATES = frozenset(
    {
        "08000", "08001", "08003", "08004", "08006", "08007", "08P01",
        "57P01", "57P02", "57P03",
        "53300",
        "55P03", "25P03",
        "40001", "40P01",
    }
)  # fmt: skip


def is_transient(exc: BaseException) -> bool:
    """Tell whether `exc` is an infrastructure failure that a rerun of the same work may fix.

    A lost connection comes without a SQLSTATE ("server closed the connection
    unexpectedly", "the connection is closed", a pool timeout): every such
    OperationalError or InterfaceError is transient. An error the server reports with a
    SQLSTATE outside TRANSIENT_SQLSTATES (a constraint, a program limit) is not.
    """
    if not isinstance(exc, psycopg.Error):
        return False
    if exc.sqlstate is not None:
        return exc.sqlstate in TRANSIENT_SQLSTATES
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


@dataclass(frozen=True, slots=True)
class SessionTimeouts:
    """The timeouts every pgbatch session runs with; 0 disables one (PostgreSQL's meaning)."""

    lock_timeout_ms: int = 2_000
    idle_in_transaction_timeout_ms: int = 5_000
    tcp_keepalives_idle_s: int = 10
    tcp_keepalives_interval_s: int = 5
    tcp_keepalives_count: int = 3

    def connect_kwargs(self, url: str) -> dict[str, Any]:
        """Return libpq parameters for the client side: keepalives on the client's socket.

        They let the client notice a server that vanished (a half-open session) instead
        of waiting forever on a read; the server's side is set by apply_session_timeouts.
        A parameter the URL sets itself is left to the URL.
        """
        if not self.tcp_keepalives_idle_s:
            return {}
        wanted = {
            "keepalives": 1,
            "keepalives_idle": self.tcp_keepalives_idle_s,
            "keepalives_interval": self.tcp_keepalives_interval_s,
            "keepalives_count": self.tcp_keepalives_count,
        }
        given = conninfo_to_dict(url)
        return {key: value for key, value in wanted.items() if key not in given}


async def apply_session_timeouts(
    conn: psycopg.AsyncConnection[Any], timeouts: SessionTimeouts
) -> None:
    """Set the session's lock, idle-in-transaction and server-side keepalive timeouts."""
    # Not in the startup packet's `options`: that would replace options given in the URL.
    await conn.execute(
        query("session_set_timeouts"),
        {
            "lock_timeout": f"{timeouts.lock_timeout_ms}ms",
            "idle_timeout": f"{timeouts.idle_in_transaction_timeout_ms}ms",
            "keepalives_idle": str(timeouts.tcp_keepalives_idle_s),
            "keepalives_interval": str(timeouts.tcp_keepalives_interval_s),
            "keepalives_count": str(timeouts.tcp_keepalives_count),
        },
    )
    # set_config inside the implicit transaction of a non-autocommit connection would be
    # rolled back with it; the pool's connections are autocommit, others commit here.
    if not conn.autocommit:
        await conn.commit()


def session_timeouts(settings: Settings) -> SessionTimeouts:
    """Return the session timeouts the settings ask for."""
    return SessionTimeouts(
        lock_timeout_ms=settings.session_lock_timeout_ms,
        idle_in_transaction_timeout_ms=settings.session_idle_in_transaction_timeout_ms,
        tcp_keepalives_idle_s=settings.tcp_keepalives_idle_s,
        tcp_keepalives_interval_s=settings.tcp_keepalives_interval_s,
        tcp_keepalives_count=settings.tcp_keepalives_count,
    )
