"""Counters and batch latencies of one service, for operators and exporters."""

from __future__ import annotations

import collections
import logging
import math
from collections.abc import Callable

__all__ = ["ServiceMetrics"]

log = logging.getLogger("kernel.metrics")

# Percentiles are over a window of recent batches, so a long-lived service stays
# constant in memory and the numbers describe how it behaves now.
_LATENCY_WINDOW = 1024


def _percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile; 0.0 for no data."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


class ServiceMetrics:
    """Plain counters, updated by the service as batches run (single trio thread).

    ``snapshot()`` returns a dict with at least: ``batches_total``,
    ``agent_invocations_total``, ``agent_failure_count``, ``pool_exhaustion_errors``,
    ``halted_batches``, ``pool_active_count``, ``concurrent_invocation_total_ms`` (the
    last batch) and ``p50_ms`` / ``p95_ms`` / ``p99_ms`` of recent batch latencies.
    ``failures_by_kind`` breaks the failure count down by :class:`FailureKind` value.
    """

    def __init__(self, pool_active: Callable[[], int]) -> None:
        self._pool_active = pool_active
        self.batches_total = 0
        self.agent_invocations_total = 0
        self.agent_success_count = 0
        self.agent_failure_count = 0
        self.failures_by_kind: collections.Counter[str] = collections.Counter()
        self.pool_exhaustion_errors = 0
        self.halted_batches = 0
        self.last_batch_ms = 0.0
        self.batch_latency_sum_ms = 0.0
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._batch_observers: list[Callable[[float], object]] = []

    def add_batch_observer(self, observer: Callable[[float], object]) -> None:
        """Call ``observer(total_ms)`` after every batch (e.g. an exporter's histogram).

        An observer that raises is removed from nothing and breaks nothing: the error is
        logged and the batch result stands.
        """
        self._batch_observers.append(observer)

    def record_batch(self, total_ms: float) -> None:
        self.batches_total += 1
        self.last_batch_ms = total_ms
        self.batch_latency_sum_ms += total_ms
        self._latencies.append(total_ms)
        for observer in self._batch_observers:
            try:
                observer(total_ms)
            except Exception:
                log.exception("batch metrics observer raised; ignored")

    def recent_batch_latencies_ms(self) -> tuple[float, ...]:
        return tuple(self._latencies)

    def snapshot(self) -> dict[str, object]:
        ordered = sorted(self._latencies)
        return {
            "batches_total": self.batches_total,
            "agent_invocations_total": self.agent_invocations_total,
            "agent_success_count": self.agent_success_count,
            "agent_failure_count": self.agent_failure_count,
            "failures_by_kind": dict(self.failures_by_kind),
            "pool_exhaustion_errors": self.pool_exhaustion_errors,
            "halted_batches": self.halted_batches,
            "pool_active_count": self._pool_active(),
            "concurrent_invocation_total_ms": self.last_batch_ms,
            "batch_latency_sum_ms": self.batch_latency_sum_ms,
            "p50_ms": _percentile(ordered, 50),
            "p95_ms": _percentile(ordered, 95),
            "p99_ms": _percentile(ordered, 99),
        }
