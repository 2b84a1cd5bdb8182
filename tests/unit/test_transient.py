"""is_transient (which database errors are the infrastructure's) and client keepalives."""

from __future__ import annotations

import psycopg
import pytest
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from pgbatch.db.sessions import SessionTimeouts, is_transient


@pytest.mark.parametrize(
    "exc",
    [
        pg_errors.AdminShutdown(),  # 57P01: the server is restarting
        pg_errors.CannotConnectNow(),  # 57P03: still starting up
        pg_errors.LockNotAvailable(),  # 55P03: lock_timeout
        pg_errors.IdleInTransactionSessionTimeout(),  # 25P03
        pg_errors.SerializationFailure(),
        pg_errors.DeadlockDetected(),
        pg_errors.ConnectionFailure(),  # 08006
        pg_errors.TooManyConnections(),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        psycopg.OperationalError("the connection is closed"),
        PoolTimeout("couldn't get a connection after 30.00 sec"),
    ],
    ids=type,
)
def test_infrastructure_failures_are_transient(exc: Exception) -> None:
    assert is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        pg_errors.UniqueViolation(),  # a handler's row broke a constraint
        pg_errors.ProgramLimitExceeded(),  # 54000: a poison shard, rerunning cannot help
        pg_errors.QueryCanceled(),  # someone cancelled it on purpose
        pg_errors.UndefinedTable(),
        psycopg.ProgrammingError("bad query"),
        RuntimeError("not a database error"),
    ],
    ids=type,
)
def test_other_failures_are_not(exc: Exception) -> None:
    assert not is_transient(exc)


def test_client_keepalives_leave_what_the_url_sets_to_the_url() -> None:
    timeouts = SessionTimeouts(tcp_keepalives_idle_s=10)
    assert timeouts.connect_kwargs("postgresql://h/db")["keepalives_idle"] == 10
    given = timeouts.connect_kwargs("postgresql://h/db?keepalives_idle=99")
    assert "keepalives_idle" not in given and given["keepalives_count"] == 3
    assert SessionTimeouts(tcp_keepalives_idle_s=0).connect_kwargs("postgresql://h/db") == {}
