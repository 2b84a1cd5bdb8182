"""What a batch used and cost, and the shared limits' live state: for the API, CLI, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pgbatch.workloads.llm import queries
from pgbatch.workloads.llm.queries import BatchUsageRow, LimitState
from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.usage import Price

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["UsageReport", "batch_usage_report", "limit_states", "usage_totals"]


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A batch's usage per model and in total, with the estimated cost (None: no price)."""

    batch_id: int
    models: list[BatchUsageRow]
    total: BatchUsageRow
    cost_usd: float | None
    unpriced_models: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready values."""

        def row(r: BatchUsageRow) -> dict[str, Any]:
            return {
                "model": r.model, "requests": r.requests, "failed": r.failed,
                "upstream_calls": r.upstream_calls, "rate_limited": r.rate_limited,
                "cache_hits": r.cache_hits, "prompt_tokens": r.prompt_tokens,
                "completion_tokens": r.completion_tokens, "cached_tokens": r.cached_tokens,
            }  # fmt: skip

        return {
            "batch_id": self.batch_id,
            "models": [row(r) for r in self.models],
            "total": {k: v for k, v in row(self.total).items() if k != "model"},
            "cost_usd": self.cost_usd,
            "unpriced_models": self.unpriced_models,
        }


def _report(batch_id: int, rows: list[BatchUsageRow], prices: dict[str, Price]) -> UsageReport:
    total = BatchUsageRow("")
    cost = 0.0
    unpriced: list[str] = []
    for r in rows:
        for name in ("requests", "failed", "upstream_calls", "rate_limited", "cache_hits",
                     "prompt_tokens", "completion_tokens", "cached_tokens"):  # fmt: skip
            setattr(total, name, getattr(total, name) + getattr(r, name))
        price = prices.get(r.model)
        if price is None:
            if r.usage.total_tokens:
                unpriced.append(r.model)
            continue
        cost += price.cost(r.usage)
    priced = any(r.model in prices for r in rows)
    return UsageReport(batch_id, rows, total, round(cost, 8) if priced else None, unpriced)


async def batch_usage_report(app: App, batch_id: int, *, tenant: str | None = None) -> UsageReport:
    """Return a batch's usage and cost; BatchNotFoundError for another tenant's or none."""
    await app.get_batch(batch_id, tenant=tenant)
    async with app.db.connection() as conn:
        rows = await queries.batch_usage(conn, batch_id)
    return _report(batch_id, rows, dict(runner_of(app).config.prices))


async def usage_totals(app: App) -> list[BatchUsageRow]:
    """Return every batch's usage summed per model (for /metrics)."""
    await app.open()
    async with app.db.connection() as conn:
        return await queries.usage_totals(conn)


async def limit_states(app: App) -> list[LimitState]:
    """Return every shared limit's live state: used in the window, in flight, paused."""
    await app.open()
    async with app.db.connection() as conn:
        return await queries.limits_state(conn)
