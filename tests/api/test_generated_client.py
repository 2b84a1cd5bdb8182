"""A client generated from /openapi.json by openapi-python-client submits, watches,
downloads and cancels batches, and reads the API's errors as typed values.

The generator is a real one from PyPI (the dev extra); it runs with --fail-on-warning, so
an operation or a body it would drop (the NDJSON upload, once) fails the test.
"""

from __future__ import annotations

import asyncio
import importlib
import io
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import orjson
import pytest
import pytest_asyncio

from tests.api.conftest import RunningApi
from tests.helpers import wait_until

# Generating and formatting the client takes a few seconds; this bounds a stuck generator.
GENERATE_TIMEOUT_S = 60.0
# A few small batches run by the API's own worker.
FINISH_S = 30.0
PACKAGE = "pgbatch_generated_client"


@pytest_asyncio.fixture
async def generated(api: RunningApi, tmp_path: Path) -> AsyncIterator[ModuleType]:
    """Generate a client package from the running API's document and import it."""
    async with api.client() as client:
        document = await client.get("/openapi.json")
    assert document.status_code == 200, document.text
    spec = tmp_path / "openapi.json"
    spec.write_bytes(document.content)
    bin_dir = Path(sys.executable).parent
    process = await asyncio.create_subprocess_exec(
        str(bin_dir / "openapi-python-client"), "generate", "--path", str(spec),
        "--meta", "none", "--output-path", str(tmp_path / PACKAGE), "--fail-on-warning",
        # The generator formats its output with ruff, which it looks for on PATH.
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), GENERATE_TIMEOUT_S)
    report = out.decode()
    assert process.returncode == 0, report
    assert "Warning" not in report, report
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def _module(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


@pytest.mark.asyncio
async def test_the_generated_client_submits_watches_downloads_and_cancels(
    api: RunningApi, generated: ModuleType
) -> None:
    submit_batch = _module(generated, "api.batches.submit_batch")
    get_batch = _module(generated, "api.batches.get_batch")
    batch_results = _module(generated, "api.batches.batch_results")
    cancel_batch = _module(generated, "api.batches.cancel_batch")
    batch_events = _module(generated, "api.events.batch_events")
    models = _module(generated, "models")
    types = _module(generated, "types")
    client = generated.Client(base_url=api.base_url, raise_on_unexpected_status=True)

    async with client:
        # Submit with a JSON body, then with NDJSON (a binary body to the generator).
        items = [{"n": n, "text": f"ligne {n} ✓"} for n in range(25)]
        created = await submit_batch.asyncio_detailed(
            client=client, body=models.BatchSubmit(task="echo", items=items, shard_size=10)
        )
        assert created.status_code == 201, created.content
        json_batch = created.parsed
        assert isinstance(json_batch, models.BatchOut)
        assert (json_batch.total_items, json_batch.total_shards) == (25, 3)
        ndjson = b"".join(orjson.dumps(item) + b"\n" for item in items)
        # A file object streams only from the generated sync function (httpx's async
        # client refuses a sync stream): run it in a thread, as a script would just call it.
        streamed = await asyncio.to_thread(
            submit_batch.sync_detailed,
            client=generated.Client(base_url=api.base_url),
            body=types.File(payload=io.BytesIO(ndjson), mime_type="application/octet-stream"),
            task="echo",
            shard_size=5,
        )
        assert streamed.status_code == 201, streamed.content
        assert (streamed.parsed.total_items, streamed.parsed.total_shards) == (25, 5)

        # Watch each until it ends, with the generated reads only.
        for batch_id in (json_batch.id, streamed.parsed.id):

            async def ended(batch_id: int = batch_id) -> Any:
                batch = await get_batch.asyncio(client=client, batch_id=batch_id)
                return batch if batch.is_final else None

            final = await wait_until(ended, FINISH_S)
            assert final.status == models.BatchStatus.SUCCEEDED
            assert final.items_ok == 25
            events = await batch_events.asyncio_detailed(client=client, batch_id=batch_id)
            assert b"event: end" in events.content

            # Download the results: NDJSON, one line per item, in order.
            results = await batch_results.asyncio_detailed(
                client=client, batch_id=batch_id, status=models.ResultStatus.ALL
            )
            lines = [orjson.loads(line) for line in results.content.splitlines()]
            assert [(r["seq"], r["ok"], r["output"]) for r in lines] == [
                (n, True, item) for n, item in enumerate(items)
            ]
            csv = await batch_results.asyncio_detailed(
                client=client, batch_id=batch_id, format_=models.ResultFormat.CSV
            )
            assert csv.content.splitlines()[0] == b"seq,ok,output,error"

        # Cancel a held batch; the errors come back as typed values.
        held = await submit_batch.asyncio(
            client=client, body=models.BatchSubmit(task="gated", items=[1, 2])
        )
        cancelled = await cancel_batch.asyncio(client=client, batch_id=held.id)
        assert cancelled.status == models.BatchStatus.CANCELLED
        again = await cancel_batch.asyncio(client=client, batch_id=held.id)
        assert isinstance(again, models.ErrorOut)
        assert again.error.code == models.ErrorCode.INVALID_STATE
        missing = await get_batch.asyncio(client=client, batch_id=987_654_321)
        assert isinstance(missing, models.ErrorOut)
        assert missing.error.code == models.ErrorCode.BATCH_NOT_FOUND
