"""The LLM workload's queries: shared limits, usage, the response cache (sql/llm.sql)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg.types.json import Jsonb

from pgbatch.db.migrations import Component
from pgbatch.db.queries import QueryMap
from pgbatch.db.shards import CommitStatement
from pgbatch.workloads.llm.usage import Usage

__all__ = [
    "COMPONENT",
    "WINDOW_S",
    "BatchUsageRow",
    "CachedAnswer",
    "Grant",
    "LimitState",
    "batch_usage",
    "batch_usage_statement",
    "cache_get",
    "cache_put_statement",
    "limits_state",
    "pause",
    "prune_request_usage",
    "request_usage",
    "reserve",
    "settle",
    "settle_statement",
    "usage_totals",
]

query = QueryMap("pgbatch.workloads.llm")
COMPONENT = Component("llm", "pgbatch.workloads.llm")
# Providers count requests and tokens per minute over a sliding minute: so does the limit.
# PGBATCH_LLM_WINDOW_S shortens it for benchmarks against the fake (whose window is
# shortened alike); rpm and tpm then mean per window. Leave it at 60 against a provider.
WINDOW_S = float(os.environ.get("PGBATCH_LLM_WINDOW_S", "60"))


@dataclass(frozen=True, slots=True)
class Grant:
    """What one reservation got: the first `granted` requests, or how long to wait."""

    granted: int
    tokens: int
    reservation_id: int | None
    wait_s: float


async def reserve(
    conn: psycopg.AsyncConnection[Any],
    *,
    name: str,
    rpm: int | None,
    tpm: int | None,
    max_in_flight: int | None,
    shard_id: int,
    lease_epoch: int,
    tokens: Sequence[int],
    settle: Sequence[tuple[int, int, int]] = (),
) -> Grant:
    """Reserve the longest prefix of `tokens` (one estimate per request) the limit allows.

    One statement, committed at once so every other worker sees the charge; it also
    settles the shard's previous rounds, given as (reservation id, requests, tokens).
    """
    ordered = sorted(settle)
    async with conn.transaction():
        cur = await conn.execute(
            query("llm_reserve"),
            {
                "name": name, "rpm": rpm, "tpm": tpm, "max_in_flight": max_in_flight,
                "shard_id": shard_id, "epoch": lease_epoch, "tokens": list(tokens),
                "window_s": WINDOW_S, "settle_ids": [r for r, _, _ in ordered],
                "settle_requests": [n for _, n, _ in ordered],
                "settle_tokens": [t for _, _, t in ordered],
            },
        )  # fmt: skip
        row = await cur.fetchone()
    assert row is not None
    return Grant(int(row[0]), int(row[1]), row[2], float(row[3]))


async def pause(conn: psycopg.AsyncConnection[Any], *, name: str, wait_s: float) -> None:
    """Pause the limit `name` for everyone for `wait_s` (a 429's Retry-After)."""
    async with conn.transaction():
        await conn.execute(query("llm_pause"), {"name": name, "wait_s": wait_s})


async def settle(
    conn: psycopg.AsyncConnection[Any], settled: Sequence[tuple[int, int, int]]
) -> None:
    """Settle (reservation id, requests, tokens) at once: calls made outside any shard."""
    statement = settle_statement(settled)
    async with conn.transaction():
        await conn.execute(statement.statement, statement.params)


def settle_statement(settled: Sequence[tuple[int, int, int]]) -> CommitStatement:
    """Return the completion's statement settling (reservation id, requests, tokens)."""
    ordered = sorted(settled)
    return CommitStatement(
        query("llm_settle"),
        {
            "ids": [r for r, _, _ in ordered],
            "requests": [n for _, n, _ in ordered],
            "tokens": [t for _, _, t in ordered],
        },
    )


@dataclass(slots=True)
class BatchUsageRow:
    """One model's totals in a batch (or summed over batches)."""

    model: str
    requests: int = 0
    failed: int = 0
    upstream_calls: int = 0
    rate_limited: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def usage(self) -> Usage:
        """Return the billed tokens (cache hits are not billed)."""
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)


def batch_usage_statement(batch_id: int, rows: Sequence[BatchUsageRow]) -> CommitStatement:
    """Return the completion's statement adding a shard's usage to its batch's totals."""
    ordered = sorted(rows, key=lambda r: r.model)
    return CommitStatement(
        query("llm_batch_usage_add"),
        {
            "batch_id": batch_id,
            "models": [r.model for r in ordered],
            "requests": [r.requests for r in ordered],
            "failed": [r.failed for r in ordered],
            "calls": [r.upstream_calls for r in ordered],
            "rate_limited": [r.rate_limited for r in ordered],
            "cache_hits": [r.cache_hits for r in ordered],
            "prompt": [r.prompt_tokens for r in ordered],
            "completion": [r.completion_tokens for r in ordered],
            "cached": [r.cached_tokens for r in ordered],
        },
    )


def _usage_rows(rows: Sequence[tuple[Any, ...]]) -> list[BatchUsageRow]:
    return [BatchUsageRow(row[0], *(int(v or 0) for v in row[1:])) for row in rows]


async def batch_usage(conn: psycopg.AsyncConnection[Any], batch_id: int) -> list[BatchUsageRow]:
    """Return a batch's totals per model."""
    cur = await conn.execute(query("llm_batch_usage"), {"batch_id": batch_id})
    return _usage_rows(await cur.fetchall())


async def usage_totals(conn: psycopg.AsyncConnection[Any]) -> list[BatchUsageRow]:
    """Return every batch's totals summed per model."""
    cur = await conn.execute(query("llm_usage_totals"))
    return _usage_rows(await cur.fetchall())


async def request_usage(
    conn: psycopg.AsyncConnection[Any], batch_id: int
) -> list[tuple[int, str, int, int, int, int, bool]]:
    """Return each request's (seq, model, attempts, prompt, completion, cached, cache hit)."""
    cur = await conn.execute(query("llm_request_usage"), {"batch_id": batch_id})
    return [tuple(row) for row in await cur.fetchall()]


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    """A stored successful answer: its body and the upstream's request id."""

    body: Any
    request_id: str


async def cache_get(
    conn: psycopg.AsyncConnection[Any], *, tenant: str, keys: Sequence[bytes]
) -> dict[bytes, CachedAnswer]:
    """Return the stored answers among `keys` (one statement for a shard)."""
    cur = await conn.execute(query("llm_cache_get"), {"tenant": tenant, "keys": list(keys)})
    return {
        bytes(k): CachedAnswer(body, request_id) for k, body, request_id in await cur.fetchall()
    }


def cache_put_statement(
    tenant: str, answers: Sequence[tuple[bytes, str, Any, str]]
) -> CommitStatement:
    """Return the completion's statement storing (key, url, body, request id) answers."""
    ordered = sorted(answers, key=lambda a: a[0])
    return CommitStatement(
        query("llm_cache_put"),
        {
            "tenant": tenant,
            "keys": [a[0] for a in ordered],
            "urls": [a[1] for a in ordered],
            "responses": [Jsonb(a[2], dumps=_dumps) for a in ordered],
            "request_ids": [a[3] for a in ordered],
        },
    )


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True, slots=True)
class LimitState:
    """A shared limit's live state: configured, used in the window, in flight, paused."""

    name: str
    rpm: int | None
    tpm: int | None
    max_in_flight: int | None
    paused_for_s: float
    pauses: int
    window_requests: int
    window_tokens: int
    in_flight: int


async def limits_state(conn: psycopg.AsyncConnection[Any]) -> list[LimitState]:
    """Return every shared limit's live state, by name."""
    cur = await conn.execute(query("llm_limits_state"), {"window_s": WINDOW_S})
    return [
        LimitState(
            name, rpm, tpm, flight, float(paused or 0), int(pauses), int(req), int(tok), int(fly)
        )
        for name, rpm, tpm, flight, paused, pauses, req, tok, fly in await cur.fetchall()
    ]


async def prune_request_usage(conn: psycopg.AsyncConnection[Any], batch_id: int, limit: int) -> int:
    """Delete up to `limit` per-request usage rows of a pruned batch; return how many.

    0 in a database without the workload's tables: `pgbatch prune` calls it whether or not
    the app it runs with uses the LLM workload.
    """
    exists = await (await conn.execute(query("llm_request_usage_exists"))).fetchone()
    if not (exists and exists[0]):
        return 0
    cur = await conn.execute(
        query("llm_request_usage_prune"), {"batch_id": batch_id, "limit": limit}
    )
    return cur.rowcount
