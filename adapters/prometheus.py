"""Export a service's metrics to Prometheus (``prometheus_client``), and serve them.

    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    serve_metrics(9464, registry=registry)      # http://127.0.0.1:9464/metrics

Metric names (namespace ``conclave`` by default), following Prometheus conventions:

    conclave_batches_total                      counter
    conclave_agent_invocations_total            counter
    conclave_agent_failures_total{kind=...}     counter (one series per FailureKind)
    conclave_pool_exhaustion_errors_total       counter
    conclave_halted_batches_total               counter
    conclave_hedges_launched_total              counter
    conclave_hedges_won_total                   counter
    conclave_batch_duration_seconds             histogram
    conclave_pool_active_agents                 gauge
    conclave_pool_available_slots               gauge
    conclave_pool_capacity                      gauge

Counters and gauges are read from ``service.metrics`` at scrape time (no second set of
books); the histogram is fed after each batch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kernel import ConcurrentDeliberationService, FailureKind, InvalidRequestError

__all__ = ["BATCH_BUCKETS_S", "ServiceCollector", "export_service_metrics", "serve_metrics"]

#: Batch latency buckets, seconds: from a stub's milliseconds to a slow model's minutes.
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServiceCollector(Collector):
    """Reads a :class:`~kernel.ConcurrentDeliberationService`'s counters at scrape time."""

    def __init__(self, service: ConcurrentDeliberationService, namespace: str = "conclave"):
        self.service = service
        self.namespace = namespace

    def collect(self) -> Iterator[Metric]:
        ns = self.namespace
        snap = self.service.metrics.snapshot()
        pool = self.service.get_pool_status()

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{ns}_{name}", doc, value=float(value))

        yield counter("batches", "Batches run to an outcome (incl. halted).", snap.batches_total)
        yield counter(
            "agent_invocations", "Agent invocations started.", snap.agent_invocations_total
        )
        failures = CounterMetricFamily(
            f"{ns}_agent_failures", "Agent failures, by kind.", labels=["kind"]
        )
        by_kind = snap.failures_by_kind
        for kind in FailureKind:
            failures.add_metric([kind.value], float(by_kind.get(kind.value, 0)))
        yield failures
        yield counter(
            "pool_exhaustion_errors",
            "Batches refused by FR10 admission (capacity or busy agent).",
            snap.pool_exhaustion_errors,
        )
        yield counter(
            "halted_batches", "Batches refused or stopped by a halt.", snap.halted_batches
        )
        yield counter("hedges_launched", "Duplicate calls for slow agents.", snap.hedges_launched)
        yield counter("hedges_won", "Duplicate calls that answered first.", snap.hedges_won)
        yield GaugeMetricFamily(
            f"{ns}_pool_active_agents", "Agents in flight now.", value=pool.active_count
        )
        yield GaugeMetricFamily(
            f"{ns}_pool_available_slots", "Free pool slots now.", value=pool.available_count
        )
        yield GaugeMetricFamily(
            f"{ns}_pool_capacity", "Pool capacity (max_concurrent).", value=pool.max_concurrent
        )


def export_service_metrics(
    service: ConcurrentDeliberationService,
    registry: CollectorRegistry = REGISTRY,
    *,
    namespace: str = "conclave",
) -> ServiceCollector:
    """Register ``service``'s metrics with ``registry``; returns the collector."""
    if not isinstance(service, ConcurrentDeliberationService):
        raise InvalidRequestError(f"expected a ConcurrentDeliberationService, got {service!r}")
    collector = ServiceCollector(service, namespace)
    registry.register(collector)
    histogram = Histogram(
        f"{namespace}_batch_duration_seconds",
        "Wall time of each batch, admission to result.",
        buckets=BATCH_BUCKETS_S,
        registry=registry,
    )
    service.metrics.add_batch_observer(lambda total_ms: histogram.observe(total_ms / 1000.0))
    return collector


def serve_metrics(
    port: int, *, addr: str = "127.0.0.1", registry: CollectorRegistry = REGISTRY
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` (loopback by default) from a daemon thread.

    ``port=0`` picks a free port: read it from ``server.server_port``.  Stop with
    ``server.shutdown()``.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InvalidRequestError(f"port must be 0-65535, got {port!r}")
    return start_http_server(port, addr=addr, registry=registry)
