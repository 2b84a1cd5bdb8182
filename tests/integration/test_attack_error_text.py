"""Attack on issue 12's failures: an error text PostgreSQL cannot store (a NUL, a lone
surrogate) in a handler's exception, its traceback or pgbatch.error() must still end the
shard with that error, shown escaped. Seen failing: a NUL in the exception message made
the group completion raise psycopg.DataError, the shard stayed `running` ("unexpected
error; its lease will expire") and was claimed again forever; a lone surrogate was
reported as "cannot store the handler's output" instead of the handler's own error."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import pgbatch
from tests.conftest import settings_for

HOSTILE = {
    "nul": "bad\x00nul [/red] <script>x</script>",
    "surrogate": "lone \ud800 surrogate",
}


def _app(database_url: str, *, raise_it: bool, isolate: bool) -> Any:
    app = pgbatch.App(settings=settings_for(database_url))

    @app.task(
        "hostile", shard_size=2, max_attempts=1, isolate_poison="bisect" if isolate else "off"
    )
    async def hostile(
        items: list[pgbatch.Item], ctx: pgbatch.ShardContext
    ) -> list[pgbatch.Outcome]:
        out = []
        for item in items:
            if item.value in HOSTILE:
                if raise_it:
                    raise ValueError(HOSTILE[item.value])
                out.append(pgbatch.error(HOSTILE[item.value]))
            else:
                out.append(pgbatch.ok(item.value))
        return out

    return app


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", sorted(HOSTILE))
@pytest.mark.parametrize(("raise_it", "isolate"), [(True, True), (True, False), (False, False)])
async def test_an_unstorable_error_text_ends_the_shard_escaped(
    database_url: str, kind: str, raise_it: bool, isolate: bool
) -> None:
    app = _app(database_url, raise_it=raise_it, isolate=isolate)
    await app.open()
    try:
        batch = await app.submit("hostile", [kind, "fine"])
        worker = app.worker(concurrency=2)
        running = asyncio.create_task(worker.run())
        try:
            done = await app.wait(batch.id, timeout_s=20)
        finally:
            worker.request_stop()
            await asyncio.wait_for(running, 30)
        assert done.items_failed >= 1
        failed = [o async for _, o in app.results(batch.id, errors_only=True)]
        first = failed[0].error or ""
        assert "cannot store" not in first
        escaped = "\\x00" if kind == "nul" else "\\ud800"
        assert escaped in first
        if raise_it:
            assert failed[0].traceback is not None and escaped in failed[0].traceback
    finally:
        await app.close()
