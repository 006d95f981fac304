"""Counters and batch latencies of one service, for operators and exporters."""

from __future__ import annotations

import collections
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from kernel._errors import InvalidRequestError
from kernel._frozenmap import FrozenMap
from kernel._types import ConcurrentResult
from kernel.events import KernelObserver, Observers
from kernel.validate import check_number

__all__ = ["MetricsSnapshot", "ServiceMetrics", "nearest_rank"]

log = logging.getLogger("kernel.metrics")

# Percentiles are over a window of recent batches, so a long-lived service stays
# constant in memory and the numbers describe how it behaves now.
_LATENCY_WINDOW = 1024


def nearest_rank(values: Iterable[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of ``values`` (0 < q <= 1): the smallest value
    with at least a fraction ``q`` of them at or below it, always one of the values.

    The one quantile of the project (metrics, hedging, benchmarks).  ``q`` out of range
    or no values: :class:`~kernel.InvalidRequestError`.
    """
    q = check_number(q, "q", above=0, at_most=1)
    ordered = sorted(values)
    if not ordered:
        raise InvalidRequestError("nearest_rank needs at least one value")
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def _percentile(ordered: list[float], q: float) -> float:
    """0.0 for no data (before the first batch)."""
    return nearest_rank(ordered, q) if ordered else 0.0


def _frozen_counts(counts: Mapping[str, int]) -> FrozenMap[int]:
    return FrozenMap(counts)


@attrs.frozen(slots=True)
class MetricsSnapshot:
    """A service's counters at one instant (from :meth:`ServiceMetrics.snapshot`).

    ``concurrent_invocation_total_ms`` is the last batch's wall time; the percentiles
    are over the last 1,024 batches (0.0 before the first).  :meth:`as_dict` gives the
    same numbers as a plain dict, keyed by field name.
    """

    batches_total: int
    agent_invocations_total: int
    agent_success_count: int
    agent_failure_count: int
    #: Failure count by :class:`~kernel.FailureKind` value (only kinds seen).
    failures_by_kind: Mapping[str, int] = attrs.field(converter=_frozen_counts)
    pool_exhaustion_errors: int
    halted_batches: int
    pool_active_count: int
    concurrent_invocation_total_ms: float
    batch_latency_sum_ms: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    #: Duplicate calls started for slow agents, and how many of them answered first.
    hedges_launched: int = 0
    hedges_won: int = 0

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self, value_serializer=_plain)

    def __getitem__(self, key: str) -> Any:
        """``snapshot["p99_ms"]``, the older mapping form: deprecated (read the attribute,
        or :meth:`as_dict`); kept for one release."""
        warnings.warn(
            f"MetricsSnapshot[{key!r}] is deprecated; read snapshot.{key} or as_dict()",
            DeprecationWarning,
            stacklevel=2,
        )
        if key not in _FIELD_NAMES:
            raise KeyError(key)
        return getattr(self, key)


_FIELD_NAMES = frozenset(a.name for a in attrs.fields(MetricsSnapshot))


def _plain(_inst: object, _field: object, value: Any) -> Any:
    return dict(value) if isinstance(value, FrozenMap) else value


class ServiceMetrics:
    """Counters of one service, recorded as its batches run (single trio thread).

    The service records through the ``record_*`` methods; readers take a
    :class:`MetricsSnapshot` with :meth:`snapshot`, subscribe to batch latencies with
    :meth:`add_batch_observer`, or to every event of every batch (metrics, traces) with
    :meth:`add_observer`.
    """

    def __init__(self, pool_active: Callable[[], int]) -> None:
        self._pool_active = pool_active
        self._batches_total = 0
        self._invocations = 0
        self._successes = 0
        self._failures = 0
        self._failures_by_kind: collections.Counter[str] = collections.Counter()
        self._pool_exhaustion_errors = 0
        self._halted_batches = 0
        self._last_batch_ms = 0.0
        self._latency_sum_ms = 0.0
        self._latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._batch_observers: list[Callable[[float], object]] = []
        self._hedges_launched = 0
        self._hedges_won = 0
        #: The observers of the service's batches (:mod:`kernel.events`).
        self.observers = Observers()

    def add_observer(self, observer: KernelObserver) -> None:
        """Deliver every event of every batch to ``observer.observe(event)`` (see
        :class:`~kernel.KernelObserver`): batch and agent starts and ends, hedges, stops,
        rate-limit waits.  An observer that raises or is slow is logged; the batch goes on
        unchanged.  Without observers, no event is built."""
        if not isinstance(observer, KernelObserver):
            raise InvalidRequestError(
                f"observer must have an observe(event) method, got {type(observer).__name__}"
            )
        self.observers.add(observer)

    def remove_observer(self, observer: KernelObserver) -> None:
        """Stop delivering events to ``observer`` (no error if it was not added)."""
        self.observers.remove(observer)

    def add_batch_observer(self, observer: Callable[[float], object]) -> None:
        """Call ``observer(total_ms)`` after every batch (e.g. an exporter's histogram).

        An observer that raises breaks nothing: the error is logged and the batch
        result stands.
        """
        self._batch_observers.append(observer)

    # ------------------------------------------------------------ recording (the service)

    def record_refused(self) -> None:
        """A batch was refused admission (FR10)."""
        self._pool_exhaustion_errors += 1

    def record_halted(self) -> None:
        """A batch was refused because the system was halted before it started."""
        self._halted_batches += 1

    def record_started(self) -> None:
        """An agent was invoked."""
        self._invocations += 1

    def record_hedge_launched(self) -> None:
        """A duplicate call was started for a slow agent."""
        self._hedges_launched += 1

    def record_hedge_won(self) -> None:
        """A duplicate call answered first (its output is the agent's)."""
        self._hedges_won += 1

    def record_result(self, result: ConcurrentResult, *, halted: bool) -> None:
        """A batch ended with ``result`` (``halted``: cut short by a halt)."""
        total_ms = result.total_ms
        self._batches_total += 1
        self._halted_batches += halted
        self._successes += len(result.outputs)
        self._failures += len(result.failures)
        for failure in result.failures:
            self._failures_by_kind[failure.kind.value] += 1
        self._last_batch_ms = total_ms
        self._latency_sum_ms += total_ms
        self._latencies.append(total_ms)
        for observer in self._batch_observers:
            try:
                observer(total_ms)
            except Exception:
                log.exception("batch metrics observer raised; ignored")

    # ------------------------------------------------------------ reading

    def snapshot(self) -> MetricsSnapshot:
        ordered = sorted(self._latencies)
        return MetricsSnapshot(
            batches_total=self._batches_total,
            agent_invocations_total=self._invocations,
            agent_success_count=self._successes,
            agent_failure_count=self._failures,
            failures_by_kind=self._failures_by_kind,
            pool_exhaustion_errors=self._pool_exhaustion_errors,
            halted_batches=self._halted_batches,
            pool_active_count=self._pool_active(),
            concurrent_invocation_total_ms=self._last_batch_ms,
            batch_latency_sum_ms=self._latency_sum_ms,
            p50_ms=_percentile(ordered, 0.50),
            p95_ms=_percentile(ordered, 0.95),
            p99_ms=_percentile(ordered, 0.99),
            hedges_launched=self._hedges_launched,
            hedges_won=self._hedges_won,
        )
