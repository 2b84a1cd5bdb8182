"""The fleet: live workers, queues with their depth, and pausing or resuming a queue.

Tenancy (docs/api.md, "Workers and queues"): workers and queues are shared
infrastructure, so every token sees every worker (id, host, pid, queues, tasks, slots,
heartbeat, version) and every queue's name and paused state; what is a tenant's own is
scoped: a worker's `running` lists the caller's batches only, and a queue's depth and
oldest wait count the caller's shards only (/metrics has everyone's). Pausing and
resuming a queue stops or restarts every tenant's work in it, so only the tenants in
PGBATCH_ADMIN_TENANTS may (anyone, when the server has no tokens: one operator).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Path, Request
from pydantic import BaseModel, Field

from pgbatch.api.errors import ERRORS, ApiError
from pgbatch.api.schemas import NAME_PATTERN, ErrorOut
from pgbatch.api.state import ApiState, Tenant, api_state
from pgbatch.fleet import QueueState, WorkerInfo

__all__ = ["QueueList", "QueueOut", "WorkerList", "WorkerOut", "admin_tenants", "router"]

router = APIRouter(prefix="/v1", tags=["fleet"])

QueueName = Annotated[
    str,
    Path(min_length=1, max_length=200, pattern=NAME_PATTERN, description="The queue's name."),
]
_FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: {
        "model": ErrorOut,
        "description": "Only a tenant of PGBATCH_ADMIN_TENANTS may pause or resume a queue.",
    }
}


class RunningOut(BaseModel):
    """Shards of one of the caller's batches that a worker holds."""

    batch_id: int
    shards: int


class WorkerOut(BaseModel):
    """One worker process, as its last registry heartbeat described it."""

    id: str
    host: str
    pid: int
    queues: list[str]
    tasks: list[str]
    concurrency: int
    slots_in_use: int
    version: str
    started_at: datetime
    heartbeat_at: datetime
    silent_s: float = Field(description="Seconds since its last heartbeat.")
    expired: bool = Field(
        description="Silent past its TTL: it died or froze, and serves nothing any more."
    )
    running: list[RunningOut] = Field(description="The caller's batches it holds shards of.")


class WorkerList(BaseModel):
    """Every registered worker, live first."""

    workers: list[WorkerOut]
    live: int
    slots: int = Field(description="Handler slots of the live workers.")
    slots_in_use: int


class QueueOut(BaseModel):
    """One queue: paused or not, and the caller's work in it."""

    name: str
    paused: bool
    paused_at: datetime | None
    queued_shards: int
    running_shards: int
    oldest_queued_s: float = Field(
        description="Seconds the oldest claimable queued shard has waited (0: none waits)."
    )
    live_workers: int


class QueueList(BaseModel):
    """Every queue with work, a live worker or a pause."""

    queues: list[QueueOut]


def _worker_out(worker: WorkerInfo) -> WorkerOut:
    return WorkerOut(
        id=worker.id,
        host=worker.host,
        pid=worker.pid,
        queues=list(worker.queues),
        tasks=list(worker.tasks),
        concurrency=worker.concurrency,
        slots_in_use=worker.slots_in_use,
        version=worker.version,
        started_at=worker.started_at,
        heartbeat_at=worker.heartbeat_at,
        silent_s=worker.silent_s,
        expired=worker.expired,
        running=[RunningOut(batch_id=b, shards=n) for b, n in sorted(worker.running.items())],
    )


def _queue_out(queue: QueueState) -> QueueOut:
    return QueueOut(
        name=queue.name,
        paused=queue.paused,
        paused_at=queue.paused_at,
        queued_shards=queue.queued_shards,
        running_shards=queue.running_shards,
        oldest_queued_s=queue.oldest_queued_s,
        live_workers=queue.live_workers,
    )


def admin_tenants(state: ApiState) -> frozenset[str]:
    """Return the tenants that may pause and resume queues (PGBATCH_ADMIN_TENANTS)."""
    return frozenset(t.strip() for t in state.settings.admin_tenants.split(",") if t.strip())


def _check_admin(state: ApiState, tenant: str) -> None:
    if state.tokens.enabled and tenant not in admin_tenants(state):
        raise ApiError(
            403,
            "forbidden",
            "pausing or resuming a queue stops every tenant's work in it: only the tenants "
            "in PGBATCH_ADMIN_TENANTS may",
        )


@router.get("/workers", response_model=WorkerList, responses=ERRORS())
async def list_workers(request: Request, tenant: Tenant) -> WorkerList:
    """List the worker registry; each worker's `running` shows the caller's batches only."""
    workers = await api_state(request).app.workers(tenant=tenant)
    live = [w for w in workers if not w.expired]
    return WorkerList(
        workers=[_worker_out(w) for w in workers],
        live=len(live),
        slots=sum(w.concurrency for w in live),
        slots_in_use=sum(w.slots_in_use for w in live),
    )


@router.get("/queues", response_model=QueueList, responses=ERRORS())
async def list_queues(request: Request, tenant: Tenant) -> QueueList:
    """List the queues: paused or not, the caller's queued and running shards, oldest wait."""
    queues = await api_state(request).app.queues(tenant=tenant)
    return QueueList(queues=[_queue_out(q) for q in queues])


async def _queue(state: ApiState, tenant: str, name: str) -> QueueOut:
    for queue in await state.app.queues(tenant=tenant):
        if queue.name == name:
            return _queue_out(queue)
    # Not paused and nothing of anyone's in it: an idle queue, shown as such.
    return QueueOut(
        name=name,
        paused=False,
        paused_at=None,
        queued_shards=0,
        running_shards=0,
        oldest_queued_s=0.0,
        live_workers=0,
    )


@router.post("/queues/{name}/pause", response_model=QueueOut, responses=ERRORS(extra=_FORBIDDEN))
async def pause_queue(request: Request, tenant: Tenant, name: QueueName) -> QueueOut:
    """Pause a queue: no worker claims from it any more; its running shards still finish."""
    state = api_state(request)
    _check_admin(state, tenant)
    await state.app.pause_queue(name, paused_by=tenant)
    return await _queue(state, tenant, name)


@router.post("/queues/{name}/resume", response_model=QueueOut, responses=ERRORS(extra=_FORBIDDEN))
async def resume_queue(request: Request, tenant: Tenant, name: QueueName) -> QueueOut:
    """Resume a queue: its workers are woken and claim at once. Resuming twice is fine."""
    state = api_state(request)
    _check_admin(state, tenant)
    await state.app.resume_queue(name)
    return await _queue(state, tenant, name)
