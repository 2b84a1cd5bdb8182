"""Issue 12: `pgbatch status N` shows a failure's traceback, as text (never Rich markup)."""

from __future__ import annotations

import asyncio
import json

import pytest

import pgbatch
from tests.conftest import settings_for
from tests.helpers import run_cli

# Rich would read these as markup (an unbalanced closing tag is a MarkupError).
HOSTILE = "boom [/red] [bold]x[/bold] <b>html</b>"


def _explode(value: object) -> None:
    raise RuntimeError(f"{HOSTILE} on {value}")


@pytest.mark.asyncio
async def test_status_shows_the_traceback_in_text_and_json(database_url: str) -> None:
    app = pgbatch.App(settings=settings_for(database_url))

    @app.task("explode", max_attempts=1, shard_size=4)
    async def explode(items: list[pgbatch.Item], _: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
        for item in items:
            if item.value == 2:
                _explode(item.value)
        return [pgbatch.ok(item.value) for item in items]

    async with app:
        batch = await app.submit("explode", range(4))
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            final = await app.wait(batch.id, timeout_s=60)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
    assert (final.items_ok, final.items_failed) == (3, 1)

    shown = await run_cli("status", str(batch.id), database_url=database_url)
    assert shown.code == 0, shown.output
    assert "MarkupError" not in shown.output, shown.output
    # The item's error, its traceback (the handler's frames, the message verbatim) and the
    # shard's last error, every user string printed as it is.
    assert f"item 2: failed after 1 attempts: RuntimeError: {HOSTILE} on 2" in shown.stdout
    assert "traceback of item 2:" in shown.stdout
    assert "in _explode" in shown.stdout and "in explode" in shown.stdout
    assert f"    RuntimeError: {HOSTILE} on 2" in shown.stdout
    assert "last error (shard 0, items 0-3, done): 1 of 4 items failed alone" in shown.stdout

    scripted = await run_cli("status", str(batch.id), "--json", database_url=database_url)
    assert scripted.code == 0, scripted.output
    document = json.loads(scripted.stdout)
    [sample] = document["error_samples"]
    assert sample["seq"] == 2 and f"RuntimeError: {HOSTILE} on 2" in sample["traceback"]
    last = document["last_error"]
    assert (last["shard_no"], last["status"]) == (0, "done")
    assert "in _explode" in last["traceback"]
