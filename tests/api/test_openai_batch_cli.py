"""Issue 10 review: `pgbatch llm results|status` of a batch made through /openai/v1.

The CLI took only pgbatch's numeric batch id, which a user of the OpenAI API never sees
(`batch_N` numbers the OpenAI batch, not its pgbatch batch): `pgbatch llm results
batch_1` was refused by the argument parser. It now takes either."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from pgbatch.workloads.llm.fake_upstream import FakeUpstream
from tests.api.conftest import StartApi
from tests.api.test_openai_batch_api import (
    BATCH_DEADLINE_S,
    TERMINAL,
    _create,
    _upload,
    request_file,
    request_line,
    upstream,  # noqa: F401  (the fixture)
)
from tests.helpers import run_cli


@pytest.mark.asyncio
async def test_the_cli_reads_an_openai_batch_by_its_openai_id(
    start_api: StartApi,
    upstream: FakeUpstream,  # noqa: F811
    tmp_path: Path,
) -> None:
    async with start_api(tenants=("acme",)) as api, api.client("acme") as http:
        # A pgbatch batch first, so the OpenAI batch's number is not its pgbatch batch's.
        first = await _upload(http, request_file([request_line("z")]))
        await _create(http, first)
        data = request_file([request_line(f"k{i}") for i in range(6)])
        batch = (await _create(http, await _upload(http, data))).json()
        deadline = time.monotonic() + BATCH_DEADLINE_S
        while batch["status"] not in TERMINAL:
            assert time.monotonic() < deadline, batch
            await asyncio.sleep(0.05)
            batch = (await http.get(f"/openai/v1/batches/{batch['id']}")).json()
        assert batch["id"] == "batch_2"
        expected = (await http.get(f"/openai/v1/files/{batch['output_file_id']}/content")).content
        out = tmp_path / "out.jsonl"
        url = api.app.db.url
        result = await run_cli(
            "llm", "results", batch["id"], "-o", str(out), "--no-wait", database_url=url
        )
        assert result.code == 0, result
        assert out.read_bytes() == expected
        status = await run_cli("llm", "status", batch["id"], "--json", database_url=url)
        assert status.code == 0, status
        missing = await run_cli("llm", "status", "batch_99", database_url=url)
        assert missing.code != 0 and "batch_99" in missing.stderr, missing
        assert "Traceback" not in missing.stderr
