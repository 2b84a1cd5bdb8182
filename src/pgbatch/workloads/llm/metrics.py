"""The LLM workload's Prometheus series: shared limits' live state, usage and cost by model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from pgbatch.workloads.llm.runner import runner_of
from pgbatch.workloads.llm.status import limit_states, usage_totals

if TYPE_CHECKING:
    from pgbatch.app import App

__all__ = ["MAX_MODEL_LABELS", "render"]

# Model names come from requests: past this many, the rest are summed as "other", so a
# tenant inventing names cannot grow the series without bound.
MAX_MODEL_LABELS = 50


async def render(app: App) -> bytes:
    """Return the workload's series in the Prometheus text format (appended to /metrics)."""
    limits = await limit_states(app)
    totals = await usage_totals(app)
    prices = runner_of(app).config.prices
    registry = CollectorRegistry()

    def gauge(name: str, text: str, labels: list[str]) -> Gauge:
        return Gauge(name, text, labels, registry=registry)

    configured = gauge(
        "pgbatch_llm_limit", "A shared limit's configured bound.", ["limit", "bound"]
    )
    window = gauge("pgbatch_llm_limit_used", "Used in the current sliding minute.",
                   ["limit", "bound"])  # fmt: skip
    in_flight = gauge("pgbatch_llm_limit_in_flight", "Requests reserved and not settled.",
                      ["limit"])  # fmt: skip
    paused = gauge("pgbatch_llm_limit_paused_seconds", "Seconds until a 429's pause ends.",
                   ["limit"])  # fmt: skip
    pauses = gauge("pgbatch_llm_limit_pauses", "429s that paused the limit, ever.", ["limit"])
    for state in limits:
        for bound, value in (("rpm", state.rpm), ("tpm", state.tpm),
                             ("max_in_flight", state.max_in_flight)):  # fmt: skip
            if value is not None:
                configured.labels(state.name, bound).set(value)
        window.labels(state.name, "requests").set(state.window_requests)
        window.labels(state.name, "tokens").set(state.window_tokens)
        in_flight.labels(state.name).set(state.in_flight)
        paused.labels(state.name).set(state.paused_for_s)
        pauses.labels(state.name).set(state.pauses)
    requests = gauge("pgbatch_llm_requests", "Requests finished, by model and outcome.",
                     ["model", "outcome"])  # fmt: skip
    calls = gauge("pgbatch_llm_upstream_calls", "Requests sent upstream (429s included).",
                  ["model"])  # fmt: skip
    limited = gauge("pgbatch_llm_rate_limited", "Upstream 429 answers.", ["model"])
    hits = gauge("pgbatch_llm_cache_hits", "Requests answered from the cache.", ["model"])
    tokens = gauge("pgbatch_llm_tokens", "Billed tokens by model and kind.", ["model", "kind"])
    cost = gauge("pgbatch_llm_cost_usd", "Estimated cost from the price table.", ["model"])
    ranked = sorted(totals, key=lambda r: -r.requests)
    for position, row in enumerate(ranked):
        model = row.model if position < MAX_MODEL_LABELS else "other"
        requests.labels(model, "ok").inc(row.requests - row.failed)
        requests.labels(model, "failed").inc(row.failed)
        calls.labels(model).inc(row.upstream_calls)
        limited.labels(model).inc(row.rate_limited)
        hits.labels(model).inc(row.cache_hits)
        tokens.labels(model, "prompt").inc(row.prompt_tokens)
        tokens.labels(model, "completion").inc(row.completion_tokens)
        tokens.labels(model, "cached").inc(row.cached_tokens)
        price = prices.get(row.model)
        if price is not None:
            cost.labels(model).inc(price.cost(row.usage))
    return generate_latest(registry)
