"""`pgbatch demo` end to end: worker processes, the LLM example and the read-back table."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.helpers import run_cli

# 5,000 prompts with two workers take a few seconds; this bounds a slow machine.
DEMO_TIMEOUT_S = 180.0


@pytest.mark.asyncio
async def test_demo_processes_and_verifies_a_batch(database_url: str) -> None:
    result = await run_cli(
        "demo", "--items", "5000", "--workers", "2", "--port", "0",
        database_url=database_url, timeout_s=DEMO_TIMEOUT_S,
    )  # fmt: skip
    assert result.code == 0, result.output
    assert "Traceback" not in result.output, result.output
    assert "verified" in result.stdout, result.output
    assert "duplicates found" in result.stdout, result.output
    assert "dashboard: http://127.0.0.1:" in result.stdout, result.output


@pytest.mark.asyncio
async def test_the_demo_runs_outside_a_checkout(database_url: str, tmp_path: Path) -> None:
    # As from an installed wheel: another folder, and nothing of the repository importable
    # but the package itself (`examples/` is not shipped).
    env = {**os.environ, "DATABASE_URL": database_url, "COLUMNS": "200"}
    env.pop("PYTHONPATH", None)
    process = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "pgbatch"), "demo", "--items", "200",
        "--workers", "1", "--no-dashboard",
        cwd=tmp_path, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), DEMO_TIMEOUT_S)
    output = stdout.decode() + stderr.decode()
    assert process.returncode == 0, output
    assert "verified" in output, output
