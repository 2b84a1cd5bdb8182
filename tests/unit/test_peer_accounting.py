"""peers.py's bookkeeping: CPU of processes that exit mid-drain, and Graphile's connection."""

from __future__ import annotations

import getpass
import os

import pytest

from benchmarks.harness import CpuSample
from benchmarks.peer_graphile import node_connection
from benchmarks.peers import _cpu_used, _CpuMark

PARENT = 1


def _mark(at: float, processes: dict[int, float], reaped: float) -> _CpuMark:
    # Every process keeps one creation time, so a pid in both marks is the same process.
    sample = CpuSample(at, 0.0, {pid: (cpu, 100.0) for pid, cpu in processes.items()})
    return _CpuMark(sample, {PARENT: reaped})


def test_a_process_that_exits_counts_through_its_parents_reaped_time() -> None:
    # 10 survives (1.0 -> 1.5 s); 11 had used 0.2 s and exited at 0.9 s, so the parent's
    # reaped time grew by 0.9: it used 0.7 s in the window.
    before = _mark(0.0, {10: 1.0, 11: 0.2}, reaped=5.0)
    after = _mark(2.0, {10: 1.5}, reaped=5.9)
    assert _cpu_used(before, after, PARENT, [10, 11]) == pytest.approx(0.5 + 0.7)


def test_a_process_started_in_the_window_counts_whole() -> None:
    before = _mark(0.0, {10: 1.0}, reaped=0.0)
    after = _mark(2.0, {10: 1.0, 12: 0.3}, reaped=0.0)
    assert _cpu_used(before, after, PARENT, [10, 12]) == pytest.approx(0.3)


def test_node_connection_keeps_a_socket_directory_and_names_the_user() -> None:
    options = node_connection("host=/tmp/pg port=5433 dbname=bench application_name=w-0")
    user = os.environ.get("PGUSER") or getpass.getuser()
    assert options == {
        "database": "bench",
        "user": user,
        "host": "/tmp/pg",
        "port": 5433,
        "application_name": "w-0",
    }


def test_node_connection_keeps_the_url_user_and_password() -> None:
    options = node_connection("postgresql://alice:s3cret@127.0.0.1:5432/test")
    assert options["user"] == "alice"
    assert options["password"] == "s3cret"
    assert options["host"] == "127.0.0.1"
