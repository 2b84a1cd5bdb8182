"""`pgbatch demo --llm`: a request file through the fake upstream's limits, end to end."""

from __future__ import annotations

import pytest

from tests.helpers import fetch_one, run_cli


@pytest.mark.asyncio
async def test_the_llm_demo_runs_under_the_limit_without_429s(database_url: str) -> None:
    result = await run_cli("demo", "--llm", "--items", "60", database_url=database_url)
    assert result.code == 0, result.output
    assert "requests ok / failed" in result.stdout and "60 / 0" in result.stdout
    assert await fetch_one(
        database_url, "SELECT sum(requests), sum(rate_limited) FROM pgbatch.llm_batch_usage"
    ) == (60, 0)


@pytest.mark.asyncio
async def test_the_llm_demo_reports_its_rate_against_the_limit_it_obeys(database_url: str) -> None:
    """The limit is counted per 10 s window: 40 requests in a second are within 600/min,
    but the demo printed "2,201 requests/min (limit 600)", a breach to whoever reads it."""
    result = await run_cli("demo", "--llm", "--items", "40", database_url=database_url)
    assert result.code == 0, result.output
    text = " ".join(result.stdout.split())
    assert "(limit 600)" not in text, text
    assert "in the busiest 10 s (limit 100)" in text, text
