"""Prometheus pieces shared by API and worker processes: flush sizes, writer and worker stats."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from pgbatch.engine.worker import Worker
    from pgbatch.writer.models import WriterStats

__all__ = [
    "FLUSH_SIZE_BUCKETS",
    "FlushSizeCollector",
    "WorkerCollector",
    "WriterCollector",
    "serve_worker_metrics",
]

FLUSH_SIZE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
FlushSizes = Callable[[], Mapping[int, int]]


class FlushSizeCollector(Collector):
    """Turn group committers' flush-size counts into one histogram at scrape time."""

    def __init__(self, sources: Mapping[str, FlushSizes]) -> None:
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        """Yield `pgbatch_flush_size{committer}` from each source's {size: flushes}."""
        family = HistogramMetricFamily(
            "pgbatch_flush_size",
            "Items per group-commit flush, by committer (writer: documents; completer: shards).",
            labels=["committer"],
        )
        for name, read in self._sources.items():
            sizes = dict(read())
            buckets = [
                (str(float(bound)), sum(n for s, n in sizes.items() if s <= bound))
                for bound in FLUSH_SIZE_BUCKETS
            ]
            buckets.append(("+Inf", sum(sizes.values())))
            family.add_metric([name], buckets, float(sum(s * n for s, n in sizes.items())))
        yield family


class WriterCollector(Collector):
    """A group-commit writer's flush latency, queue depth, flushes, retries and isolations."""

    def __init__(self, read: Callable[[], WriterStats]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        """Yield the writer's stats, read once per scrape."""
        stats = self._read()
        latency = GaugeMetricFamily(
            "pgbatch_writer_flush_seconds",
            "Duration of the writer's recent flushes (up to 2,048 per lane), by quantile.",
            labels=["quantile"],
        )
        for quantile, seconds in (
            ("0.5", stats.flush_p50_s),
            ("0.99", stats.flush_p99_s),
            ("1", stats.flush_max_s),
        ):
            latency.add_metric([quantile], seconds)
        yield latency
        for family, name, help_text, value in (
            (
                GaugeMetricFamily,
                "queue_depth",
                "Writes waiting for a flush now.",
                stats.queue_depth,
            ),
            (
                GaugeMetricFamily,
                "max_queue_depth",
                "The most writes seen waiting in one lane at once.",
                stats.max_queue_depth,
            ),
            (
                CounterMetricFamily,
                "flushes",
                "Flushes (transactions) of the writer.",
                stats.flushes,
            ),
            (
                CounterMetricFamily,
                "retries",
                "Flush transactions rerun after a deadlock or serialization failure.",
                stats.retries,
            ),
            (
                CounterMetricFamily,
                "isolations",
                "Flushes whose fast path failed and that isolated the failing items.",
                stats.isolations,
            ),
        ):
            yield family(f"pgbatch_writer_{name}", help_text, value=value)


class WorkerCollector(Collector):
    """A worker's counters (claims, shards completed, fenced out, leases lost …)."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    def collect(self) -> Iterable[Metric]:
        """Yield one counter per field of WorkerStats."""
        stats = self._worker.stats
        for field in dataclasses.fields(stats):
            if field.name == "started_at":
                continue
            yield CounterMetricFamily(
                f"pgbatch_worker_{field.name}",
                f"This worker process's {field.name.replace('_', ' ')}.",
                value=getattr(stats, field.name),
            )


def serve_worker_metrics(
    worker: Worker, *, host: str, port: int
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `worker`'s metrics (and its completer's flush sizes) at http://host:port/."""
    registry = CollectorRegistry()
    registry.register(WorkerCollector(worker))
    registry.register(FlushSizeCollector({"completer": worker.completion_flush_sizes}))
    return start_http_server(port, addr=host, registry=registry)
