"""The demo's app: prompts sent to a model, responses stored with the shard's commit.

Part of the package so that `pgbatch demo` runs from an installed wheel. Run a worker
with `pgbatch worker --app pgbatch.demo.llm_app:app`. The model is the built-in
deterministic fake unless PGBATCH_LLM_BASE_URL names an OpenAI-compatible endpoint
(see pgbatch/demo/model_clients.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pgbatch
from pgbatch.demo.model_clients import ModelClient, ModelError, client_from_settings

app = pgbatch.App()

# No primary key on purpose: if the engine ever committed a shard twice, the demo's
# verification would see the duplicate rows instead of a constraint error hiding them.
TABLES_SQL = """
CREATE TABLE IF NOT EXISTS llm_responses (
    batch_id   bigint      NOT NULL,
    seq        bigint      NOT NULL,
    response   text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS llm_responses_batch_seq_idx ON llm_responses (batch_id, seq);
CREATE TABLE IF NOT EXISTS llm_batch_notifications (
    batch_id     bigint      NOT NULL,
    status       text        NOT NULL,
    items_ok     bigint      NOT NULL,
    items_failed bigint      NOT NULL,
    notified_at  timestamptz NOT NULL DEFAULT now()
);
"""

_client: ModelClient | None = None


def model_client() -> ModelClient:
    """Return this process's model client, created from the environment on first use."""
    global _client
    if _client is None:
        _client = client_from_settings()
    return _client


@app.on_open
async def create_tables(application: pgbatch.App) -> None:
    """Create the example's tables (idempotent; every process may run it)."""
    async with application.db.connection() as conn:
        # Serialise the DDL: ten workers starting at once would otherwise race on it.
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('llm_batch_tables'))")
            await conn.execute(TABLES_SQL)


@app.task(shard_size=100, max_attempts=5, lease_ttl_s=30)
async def summarize(items: list[pgbatch.Item], ctx: pgbatch.ShardContext) -> list[pgbatch.Outcome]:
    """Send each prompt to the model; store the responses in llm_responses."""
    client = model_client()

    async def one(item: pgbatch.Item) -> pgbatch.Outcome:
        try:
            return pgbatch.ok(await client.complete(item.value["prompt"]))
        except ModelError as exc:
            return pgbatch.error(str(exc))

    outcomes = await asyncio.gather(*(one(item) for item in items))
    ctx.copy_rows(
        "llm_responses",
        [
            (ctx.batch_id, item.seq, outcome.output)
            for item, outcome in zip(items, outcomes, strict=True)
            if outcome.ok
        ],
        columns=("batch_id", "seq", "response"),
    )
    return outcomes


@app.callback()
async def notify_done(batch: pgbatch.Batch, ctx: pgbatch.CallbackContext) -> None:
    """Record that the batch ended; committed together with the callback's done mark."""
    ctx.copy_rows(
        "llm_batch_notifications",
        [(batch.id, str(ctx.batch_status), batch.items_ok, batch.items_failed)],
        columns=("batch_id", "status", "items_ok", "items_failed"),
    )


VERIFY_SQL = """
SELECT
    (SELECT count(*) FROM (SELECT seq FROM llm_responses WHERE batch_id = %(batch_id)s
                           GROUP BY seq HAVING count(*) > 1) AS dup),
    (SELECT count(*) FROM llm_responses WHERE batch_id = %(batch_id)s),
    (SELECT count(*) FROM llm_batch_notifications WHERE batch_id = %(batch_id)s)
"""


async def verify(application: pgbatch.App, batch_id: int) -> tuple[int, int, int]:
    """Return (items with duplicate responses, responses stored, callback runs) of a batch."""
    async with application.db.connection() as conn:
        row = await (await conn.execute(VERIFY_SQL, {"batch_id": batch_id})).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def prompts(count: int) -> Iterator[dict[str, str]]:
    """Yield `count` deterministic prompts (streamed: never held in memory at once)."""
    topics = ("a contract", "a bug report", "a meeting", "a paper", "a support ticket")
    for n in range(count):
        yield {"prompt": f"Summarize {topics[n % len(topics)]} number {n} in one sentence."}
