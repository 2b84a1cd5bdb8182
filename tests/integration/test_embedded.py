"""The embedded server comes back after a postmaster crash, even when its PID was reused."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from pgbatch.db.embedded import embedded_url, stop_embedded

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("DATABASE_URL")), reason="only the embedded server has a postmaster.pid"
)


@pytest.fixture
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Return a data folder whose embedded server this test alone uses, stopped afterwards."""
    folder = Path(tmp_path_factory.mktemp("embedded"))
    yield folder
    with contextlib.suppress(Exception):
        stop_embedded(folder)
    shutil.rmtree(folder, ignore_errors=True)


def _answers(url: str) -> bool:
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError:
        return False
    return True


def _crash_postmaster(pgdata: Path) -> None:
    """SIGKILL the postmaster, as an OOM killer would, and wait for its children to go."""
    pid = int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    postmaster = psutil.Process(pid)
    children = postmaster.children(recursive=True)
    os.kill(pid, signal.SIGKILL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        psutil.wait_procs([postmaster, *children], timeout=30)
    assert (pgdata / "postmaster.pid").exists(), "a crash leaves the pid file behind"


def _write_pid(pgdata: Path, pid: int) -> None:
    pid_file = pgdata / "postmaster.pid"
    lines = pid_file.read_text().splitlines()
    lines[0] = str(pid)
    pid_file.write_text("\n".join(lines) + "\n")


def test_a_crashed_postmaster_whose_pid_was_reused_is_restarted(data_dir: Path) -> None:
    url = embedded_url(data_dir)
    assert _answers(url)
    pgdata = data_dir / "pg"
    _crash_postmaster(pgdata)
    # The dead postmaster's PID now belongs to another live process (PID reuse).
    squatter = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        _write_pid(pgdata, squatter.pid)
        again = embedded_url(data_dir)
        assert _answers(again), "embedded_url answered with a server that is not running"
    finally:
        squatter.kill()
        squatter.wait()


def test_a_crashed_postmaster_is_restarted(data_dir: Path) -> None:
    embedded_url(data_dir)
    _crash_postmaster(data_dir / "pg")
    assert _answers(embedded_url(data_dir))
