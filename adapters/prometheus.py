"""Export a service's metrics to Prometheus (``prometheus_client``), and serve them.

    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    serve_metrics(9464, registry=registry)      # http://127.0.0.1:9464/metrics

Metric names (namespace ``conclave`` by default; Prometheus conventions, base units),
each with the question it answers:

conclave_batches_total (counter)
    How many batches ran to an outcome (halted ones too)?
conclave_agent_invocations_total (counter)
    How many agent calls started?
conclave_agent_failures_total{kind} (counter, one series per FailureKind)
    Which kind of failure is rising?
conclave_pool_exhaustion_errors_total (counter)
    Were batches refused for want of capacity (FR10)?
conclave_halted_batches_total (counter)
    How many batches did a halt refuse or stop?
conclave_hedges_launched_total, conclave_hedges_won_total (counters)
    How many duplicate calls did slow agents get, and how often did one answer first?
conclave_batch_duration_seconds (histogram)
    How long does a batch take, admission to result (its p95, p99)?
conclave_batch_failures (histogram, buckets 0 1 2 3 5 10 20 36 72)
    How many agents fail per batch (the alert's "more than 5")?  Agents a quorum
    cancelled or a halt stopped are not counted (as in the alerts' failure rate): a
    quorum cut is what the caller asked for, and a halt has its own alert.
conclave_agent_duration_seconds{outcome} (histogram)
    How long does an agent take, by outcome ("ok" or the FailureKind value)?
conclave_llm_requests_total{model,status} (counter)
    How many HTTP requests went to each model, by status code ("200", "429", "503";
    "error": no answer at all)?  The 429 share, the 5xx rate.  ``model`` is the name the
    server answered with: the first 100 names seen get a series each (at most 128
    characters), any later one is counted as "other" (a server naming a new model in
    every answer must not grow the registry without bound).
conclave_llm_tokens_total{model,direction} (counter)
    How many tokens did each model take, "prompt" and "completion" (what it costs)?
conclave_rate_limit_wait_seconds_total (counter)
    How long did calls wait on a rate limit (the service's RateLimit, the provider
    budget)?  Against the agents' time: do the waits dominate?
conclave_halted (gauge)
    Is the system halted now (1) or not (0)?
conclave_halt_stop_seconds (histogram)
    How long from a halt seen to its batch stopped, every agent ended?
conclave_pool_active_agents, conclave_pool_available_slots, conclave_pool_capacity (gauges)
    How many agents run now, how many slots are free, out of how many (utilisation;
    active == capacity for long: saturated)?
conclave_shared_capacity_in_flight, conclave_shared_capacity_limit (gauges)
    With a cluster-wide capacity only: how much of it is in use (last known), out of
    how much?

Counters and gauges of the service are read from ``service.metrics`` at scrape time (no
second set of books); the rest is fed by a :class:`~kernel.KernelObserver` as batches
run, the LLM ones from what the adapters report in their outputs' and errors' metadata
(``model``, ``http_statuses``, ``prompt_tokens``, ``completion_tokens``,
``rate_limited_ms``: :mod:`adapters.llm.openai_chat`).  A call a hedge answered for is
counted once, from the call that answered.  ``conclave_halted`` asks the halt channel's
synchronous probe at scrape time when it has one (:class:`~kernel.HaltProbe`), else it
is the state the last batch (or refused call) saw.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from adapters.usage import token_count
from kernel import (
    ConcurrentDeliberationService,
    FailureKind,
    InvalidRequestError,
    KernelEvent,
)
from kernel.events import (
    AgentEnded,
    BatchEnded,
    BatchRefused,
    BatchStarted,
    BatchStopping,
    HedgeEnded,
    RateLimitWaited,
)
from kernel.validate import utf8_text

__all__ = [
    "AGENT_BUCKETS_S",
    "BATCH_BUCKETS_S",
    "FAILURES_PER_BATCH_BUCKETS",
    "HALT_STOP_BUCKETS_S",
    "ServiceCollector",
    "ServiceObserver",
    "export_service_metrics",
    "serve_metrics",
]

#: Batch latency buckets, seconds: from a stub's milliseconds to a slow model's minutes.
BATCH_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: One agent's call, seconds: the batch's buckets (a batch is its slowest agent).
AGENT_BUCKETS_S = BATCH_BUCKETS_S
#: Failed agents per batch: the alert's "more than 5", up to a whole council of 72.
FAILURES_PER_BATCH_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 36, 72)
#: Halt to batch stopped, seconds: the kernel's promise is milliseconds; seconds is a bug.
HALT_STOP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# Prometheus's metric name grammar (a namespace is a name's prefix).
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

#: Distinct ``model`` label values kept; later names are counted as ``OTHER_MODEL``.
MAX_MODELS = 100
#: The longest ``model`` label value (longer names are cut).
MAX_MODEL_CHARS = 128
OTHER_MODEL = "other"
#: The longest rate-limit wait one call's metadata is believed to report (a day).
_MAX_WAIT_MS = 86_400_000.0
#: Failure kinds that are not the agent's failure (see conclave_batch_failures).
_NOT_AGENT_FAILURES = frozenset({FailureKind.CANCELLED, FailureKind.HALTED})
# What an HTTP status label may be (else "other"): a code, or "error" (no answer).
_STATUS = re.compile(r"[1-5][0-9][0-9]|error")


class ServiceCollector(Collector):
    """Reads a :class:`~kernel.ConcurrentDeliberationService`'s counters at scrape time."""

    def __init__(
        self,
        service: ConcurrentDeliberationService,
        namespace: str = "conclave",
        observer: ServiceObserver | None = None,
    ):
        self.service = service
        self.namespace = namespace
        self.observer = observer

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
        yield GaugeMetricFamily(
            f"{ns}_halted", "1 while the system is halted, else 0.", value=self._halted()
        )
        if pool.shared_capacity is not None:
            yield GaugeMetricFamily(
                f"{ns}_shared_capacity_limit",
                "The cluster-wide capacity shared by every process.",
                value=pool.shared_capacity,
            )
            if pool.shared_in_use is not None:  # unknown until the store has answered
                yield GaugeMetricFamily(
                    f"{ns}_shared_capacity_in_flight",
                    "Slots of the cluster-wide capacity in use (last known).",
                    value=pool.shared_in_use,
                )

    def _halted(self) -> int:
        # A channel that can answer without I/O (a HaltProbe: the in-process switch, the
        # Valkey channel's subscription) is asked now: a clear shows at the next scrape.
        # One that cannot (a file) is what the last batch saw.
        probe = getattr(self.service.halt_checker, "halted_now", None)
        if callable(probe):
            try:
                return 1 if probe() else 0
            except Exception:  # a probe that cannot answer: halted, as the kernel reads it
                return 1
        return 1 if self.observer is not None and self.observer.halted else 0


def export_service_metrics(
    service: ConcurrentDeliberationService,
    registry: CollectorRegistry = REGISTRY,
    *,
    namespace: str = "conclave",
) -> ServiceCollector:
    """Register ``service``'s metrics with ``registry``; returns the collector.

    A ``namespace`` that is not a Prometheus name, or a registry that already holds
    these names, raises :class:`~kernel.InvalidRequestError` having registered nothing.
    """
    if not isinstance(service, ConcurrentDeliberationService):
        raise InvalidRequestError(f"expected a ConcurrentDeliberationService, got {service!r}")
    if not (isinstance(namespace, str) and _NAME.fullmatch(namespace)):
        raise InvalidRequestError(
            f"namespace must match [a-zA-Z_:][a-zA-Z0-9_:]* (a Prometheus name), got {namespace!r}"
        )
    observer = ServiceObserver(namespace)
    collector = ServiceCollector(service, namespace, observer)
    parts = (collector, *observer.collectors())
    try:
        for part in parts:
            registry.register(part)
    except ValueError as exc:  # a name already there: take back what was registered
        for part in parts:
            with contextlib.suppress(KeyError):
                registry.unregister(part)
        raise InvalidRequestError(f"cannot export to this registry: {exc}") from None
    service.metrics.add_batch_observer(
        lambda total_ms: observer.batch_duration.observe(total_ms / 1000.0)
    )
    service.metrics.add_observer(observer)
    return collector


class ServiceObserver:
    """The metrics fed as batches run (a :class:`~kernel.KernelObserver`): call
    durations, failures per batch, LLM requests and tokens, rate-limit waits, halts."""

    def __init__(self, namespace: str) -> None:
        registry = None  # registered by export_service_metrics, all or none
        ns = namespace
        self.halted = False  # as the service last saw its halt channel
        self._models: set[str] = set()  # the model label values given a series
        self.batch_duration = Histogram(
            f"{ns}_batch_duration_seconds",
            "Wall time of each batch, admission to result.",
            buckets=BATCH_BUCKETS_S,
            registry=registry,
        )
        self.batch_failures = Histogram(
            f"{ns}_batch_failures",
            "Failed agents per batch.",
            buckets=FAILURES_PER_BATCH_BUCKETS,
            registry=registry,
        )
        self.agent_duration = Histogram(
            f"{ns}_agent_duration_seconds",
            "Each agent's call, start to outcome, by outcome (ok or the failure kind).",
            ["outcome"],
            buckets=AGENT_BUCKETS_S,
            registry=registry,
        )
        self.llm_requests = Counter(
            f"{ns}_llm_requests",
            "HTTP requests to LLM endpoints, by model and status code (error: no answer).",
            ["model", "status"],
            registry=registry,
        )
        self.llm_tokens = Counter(
            f"{ns}_llm_tokens",
            "Tokens used, by model and direction (prompt, completion).",
            ["model", "direction"],
            registry=registry,
        )
        self.rate_limit_wait = Counter(
            f"{ns}_rate_limit_wait_seconds",
            "Seconds calls waited on a rate limit (service RateLimit and provider budget).",
            registry=registry,
        )
        self.halt_stop = Histogram(
            f"{ns}_halt_stop_seconds",
            "From a halt seen to its batch stopped, every agent ended.",
            buckets=HALT_STOP_BUCKETS_S,
            registry=registry,
        )

    def collectors(self) -> list[Collector]:
        return [
            self.batch_duration,
            self.batch_failures,
            self.agent_duration,
            self.llm_requests,
            self.llm_tokens,
            self.rate_limit_wait,
            self.halt_stop,
        ]

    def observe(self, event: KernelEvent) -> None:
        if isinstance(event, AgentEnded):
            self.agent_duration.labels(event.outcome).observe(event.duration_s)
            self._call(event.metadata)
        elif isinstance(event, HedgeEnded):
            self._call(event.metadata)
        elif isinstance(event, RateLimitWaited):
            self.rate_limit_wait.inc(event.seconds)
        elif isinstance(event, BatchEnded):
            failures = event.result.failures
            self.batch_failures.observe(sum(f.kind not in _NOT_AGENT_FAILURES for f in failures))
            if event.halt_stop_s is not None:
                self.halt_stop.observe(event.halt_stop_s)
        elif isinstance(event, BatchStopping):
            self.halted = self.halted or event.cause == "halt"
        elif isinstance(event, BatchStarted):
            self.halted = False  # the channel read clear just before
        elif isinstance(event, BatchRefused) and event.why == "halted":
            self.halted = True

    def _call(self, metadata: Mapping[str, str | int | float]) -> None:
        """What one call reported about itself (nothing, for a stub)."""
        if not metadata:
            return
        model = self._model_label(metadata.get("model"))
        statuses = metadata.get("http_statuses")
        if isinstance(statuses, str):
            for status in statuses.split():
                label = status if _STATUS.fullmatch(status) else "other"
                self.llm_requests.labels(model, label).inc()
        for key, direction in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
            tokens = token_count(metadata.get(key))  # past belief: not counted
            if tokens:
                self.llm_tokens.labels(model, direction).inc(tokens)
        waited_ms = metadata.get("rate_limited_ms")
        # A day at most, finite: inf would leave the counter inf for good (and an int
        # past a float's range raise here).
        if isinstance(waited_ms, int | float) and 0 < waited_ms <= _MAX_WAIT_MS:
            self.rate_limit_wait.inc(waited_ms / 1000.0)

    def _model_label(self, model: object) -> str:
        """``model`` as a label value, bounded: a label set only grows (every value is a
        series until the process ends), and the name comes from the server's answer."""
        name = utf8_text(str(model or "unknown")[:MAX_MODEL_CHARS])
        if name in self._models:
            return name
        if len(self._models) >= MAX_MODELS:
            return OTHER_MODEL
        self._models.add(name)
        return name


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
