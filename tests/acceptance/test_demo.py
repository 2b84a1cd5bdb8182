"""`pgbatch demo` end to end: worker processes, the LLM example and the read-back table."""

from __future__ import annotations

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
