"""The LLM workload over HTTP: a batch's usage and cost, the shared limits' live state.

The OpenAI Files/Batches API (`/openai/v1`) is its own router; these are pgbatch's views.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from pgbatch.api.errors import ERRORS
from pgbatch.api.schemas import BatchId
from pgbatch.api.state import Tenant, api_state
from pgbatch.workloads.llm.status import batch_usage_report, limit_states

__all__ = ["LimitOut", "LimitsOut", "ModelUsageOut", "UsageOut", "UsageTotalOut", "router"]

router = APIRouter(prefix="/v1/llm", tags=["llm"])


class UsageTotalOut(BaseModel):
    """Requests and tokens of a batch (cache hits are not billed: no tokens counted)."""

    requests: int
    failed: int
    upstream_calls: int
    rate_limited: int
    cache_hits: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class ModelUsageOut(UsageTotalOut):
    """One model's share of a batch's usage."""

    model: str


class UsageOut(BaseModel):
    """A batch's usage per model and in total, and its cost from the price table."""

    batch_id: int
    models: list[ModelUsageOut]
    total: UsageTotalOut
    cost_usd: float | None
    unpriced_models: list[str]


class LimitOut(BaseModel):
    """One shared limit: configured, used in the last minute, in flight, paused."""

    name: str
    rpm: int | None
    tpm: int | None
    max_in_flight: int | None
    window_requests: int
    window_tokens: int
    in_flight: int
    paused_for_s: float
    pauses: int


class LimitsOut(BaseModel):
    """Every shared limit of the deployment."""

    limits: list[LimitOut]


@router.get("/batches/{batch_id}/usage", response_model=UsageOut, responses=ERRORS(401, 404))
async def batch_usage(request: Request, tenant: Tenant, batch_id: BatchId) -> UsageOut:
    """Read a batch's tokens per model, its upstream calls and 429s, and its estimated cost."""
    report = await batch_usage_report(api_state(request).app, batch_id, tenant=tenant)
    return UsageOut.model_validate(report.as_dict())


@router.get("/limits", response_model=LimitsOut, responses=ERRORS(401))
async def limits(request: Request, tenant: Tenant) -> LimitsOut:
    """Read the shared rate limits' live state (deployment-wide: limits are the upstream's)."""
    del tenant  # authenticated, but a limit belongs to the deployment, not to a tenant
    states = await limit_states(api_state(request).app)
    return LimitsOut(limits=[LimitOut.model_validate(s, from_attributes=True) for s in states])
