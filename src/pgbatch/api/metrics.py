"""Prometheus metrics of one API process: requests, and the database's view of the work."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pgbatch.app import App
from pgbatch.metrics import FlushSizeCollector, WriterCollector

if TYPE_CHECKING:
    # Only the type of what a workload's writer reports: the API never runs a writer.
    from pgbatch.writer.models import WriterStats

__all__ = ["ApiMetrics", "CompletionFlushes", "MetricsMiddleware"]

# The method label takes these values; any other token a client sends counts as "other",
# or each invented method would add a series (labels must stay bounded).
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


class CompletionFlushes(Protocol):
    """What /metrics reads of a worker in the same process (a `pgbatch.Worker` is one)."""

    def completion_flush_sizes(self) -> Mapping[int, int]:
        """Return how many completion flushes had each size (shards)."""
        ...


class ApiMetrics:
    """A registry per API instance (tests run several in one process)."""

    def __init__(self, *, cache_s: float = 0.0) -> None:
        self.registry = CollectorRegistry()
        # A scrape reads the whole shards and batches tables' counts: 16 scrapers asking
        # each second slowed tenants' requests 100x (issue 9). One computation at a time,
        # reused for cache_s seconds, bounds that cost whatever the number of scrapers.
        self.cache_s = cache_s
        self._cached: tuple[float, bytes] | None = None
        self._computing = asyncio.Lock()
        # Scrapes asked for, and those computed (not served from the cache): test signals.
        self.scrapes = 0
        self.computations = 0
        r = self.registry
        self.request_seconds = Histogram(
            "pgbatch_http_request_duration_seconds",
            "HTTP request latency (to the end of the response body; streams included).",
            ["method", "route", "status"],
            registry=r,
        )
        self.shards = Gauge("pgbatch_shards", "Shards by state.", ["state"], registry=r)
        self.items_finished = Gauge(
            "pgbatch_items_finished",
            "Items with a terminal result, over all batches, by outcome: ok, failed or "
            "cancelled (use rate() for items/s; cancelled items are not throughput).",
            ["outcome"],
            registry=r,
        )
        self.items_per_second = Gauge(
            "pgbatch_items_per_second",
            "Items finished per second since this process's previous scrape.",
            registry=r,
        )
        self.batches = Gauge("pgbatch_batches", "Batches by status.", ["status"], registry=r)
        self.lease_takeovers = Gauge(
            "pgbatch_lease_takeovers",
            "Expired leases returned to the queue so another worker can take the shard over.",
            registry=r,
        )
        self.lease_refunds = Gauge(
            "pgbatch_lease_refunds",
            "Expired leases requeued with the attempt refunded (infrastructure, not handler).",
            registry=r,
        )
        # The fleet (issue 12 §2), every tenant's; a queue is a label only while it has
        # work, a live worker or a pause, so the label set stays as small as the queues.
        self.queue_depth = Gauge(
            "pgbatch_queue_depth", "Queued shards per queue.", ["queue"], registry=r
        )
        self.queue_oldest = Gauge(
            "pgbatch_queue_oldest_queued_seconds",
            "Seconds the oldest claimable queued shard of the queue has waited.",
            ["queue"],
            registry=r,
        )
        self.queue_paused = Gauge(
            "pgbatch_queue_paused", "1 while the queue is paused.", ["queue"], registry=r
        )
        self.workers = Gauge(
            "pgbatch_workers", "Registered workers, live or expired.", ["state"], registry=r
        )
        self.worker_slots = Gauge(
            "pgbatch_worker_slots",
            "Handler slots of the live workers: all of them, and those in use.",
            ["state"],
            registry=r,
        )
        self.batches_pruned = Gauge(
            "pgbatch_batches_pruned",
            "Finished batches removed after their retention period, ever (a running total).",
            registry=r,
        )
        self.table_bytes = Gauge(
            "pgbatch_table_bytes",
            "Size of pgbatch's per-batch tables: heap, indexes and TOAST.",
            ["table"],
            registry=r,
        )
        self._flush_sources: dict[str, Callable[[], Mapping[int, int]]] = {}
        r.register(FlushSizeCollector(self._flush_sources))
        self.writer_items = Counter(
            "pgbatch_writer_writes", "Document writes by outcome.", ["outcome"], registry=r
        )
        self.sse_streams = Gauge("pgbatch_sse_streams", "Open event streams.", registry=r)
        self._previous: tuple[float, int] | None = None

    def add_flush_source(
        self, committer: str, flush_sizes: Callable[[], Mapping[int, int]]
    ) -> None:
        """Export a group committer's flush-size distribution (size → number of flushes)."""
        self._flush_sources[committer] = flush_sizes

    def add_writer(self, stats: Callable[[], WriterStats]) -> None:
        """Export the document writer's stats: flush sizes, latency, queue depth, retries."""
        self.add_flush_source("writer", lambda: stats().flush_sizes)
        self.registry.register(WriterCollector(stats))

    def expire(self) -> None:
        """Drop the cached scrape: the next one is computed."""
        self._cached = None

    async def scrape(self, app: App, *, sse_streams: int) -> bytes:
        """Return the exposition: the cached one if fresh, else computed once for everyone."""
        self.scrapes += 1
        fresh = self._fresh()
        if fresh is not None:
            return fresh
        async with self._computing:
            # Scrapers that waited on the lock take the result of the one that held it.
            fresh = self._fresh()
            if fresh is not None:
                return fresh
            body = await self.render(app, sse_streams=sse_streams)
            self.computations += 1
            self._cached = (time.monotonic(), body)
            return body

    def _fresh(self) -> bytes | None:
        if self._cached is None or self.cache_s <= 0:
            return None
        at, body = self._cached
        return body if time.monotonic() - at < self.cache_s else None

    async def render(self, app: App, *, sse_streams: int) -> bytes:
        """Refresh the database gauges and return the text exposition."""
        snap = await app.metrics_snapshot()
        for state, value in (
            ("queued", snap.shards_queued),
            ("running", snap.shards_running),
            ("done", snap.shards_done),
            ("dead", snap.shards_dead),
        ):
            self.shards.labels(state).set(value)
        self.items_finished.labels("ok").set(snap.items_ok)
        self.items_finished.labels("failed").set(snap.items_failed)
        self.items_finished.labels("cancelled").set(snap.items_cancelled)
        for status, count in snap.batches_by_status.items():
            self.batches.labels(status).set(count)
        self.lease_takeovers.set(snap.lease_takeovers)
        self.lease_refunds.set(snap.lease_refunds)
        self.batches_pruned.set(snap.batches_pruned)
        for table, size in snap.table_bytes.items():
            self.table_bytes.labels(table).set(size)
        now, total = time.monotonic(), snap.items_ok + snap.items_failed
        if self._previous is not None and now > self._previous[0]:
            rate = max(0, total - self._previous[1]) / (now - self._previous[0])
            self.items_per_second.set(rate)
        self._previous = (now, total)
        self.sse_streams.set(sse_streams)
        await self._render_fleet(app)
        body = generate_latest(self.registry)
        for workload in app.workloads:
            if workload.metrics is not None:
                body += await workload.metrics(app)
        return body

    async def _render_fleet(self, app: App) -> None:
        """Refresh the queue and worker gauges (a queue gone since the last scrape goes)."""
        queues = await app.queues(tenant=None)
        workers = await app.workers()
        for gauge in (self.queue_depth, self.queue_oldest, self.queue_paused):
            gauge.clear()
        for queue in queues:
            self.queue_depth.labels(queue.name).set(queue.queued_shards)
            self.queue_oldest.labels(queue.name).set(queue.oldest_queued_s)
            self.queue_paused.labels(queue.name).set(int(queue.paused))
        live = [w for w in workers if not w.expired]
        self.workers.labels("live").set(len(live))
        self.workers.labels("expired").set(len(workers) - len(live))
        self.worker_slots.labels("total").set(sum(w.concurrency for w in live))
        self.worker_slots.labels("in_use").set(sum(w.slots_in_use for w in live))


class MetricsMiddleware:
    """Time every HTTP request by its route template (not its raw path: bounded labels)."""

    def __init__(
        self, app: ASGIApp, metrics: ApiMetrics, fixed_paths: frozenset[str] = frozenset()
    ) -> None:
        self.app = app
        self.metrics = metrics
        # Routes without parameters that do not name themselves in the scope (the OpenAPI
        # document, the docs pages): their path is their template, a bounded label.
        self.fixed_paths = fixed_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def record_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, record_status)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in self.fixed_paths else "unmatched"
            )
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            self.metrics.request_seconds.labels(method, template, str(status)).observe(
                time.perf_counter() - started
            )
