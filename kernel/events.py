"""What a batch tells its observers as it runs: the one port metrics and traces hang on.

A public module of the kernel, as :mod:`kernel.validate` is: the event types an observer
tells apart live here (``from kernel.events import AgentEnded``); :mod:`kernel` exports the
port itself, :class:`KernelObserver`, and :data:`KernelEvent`.

    BatchStarted -> AgentStarted -> [RateLimitWaited] [HedgeStarted -> HedgeEnded]
        -> AgentEnded (one per started agent) ... [BatchStopping] -> BatchEnded
    BatchRefused (halted, or no capacity: nothing started)

An observer is anything with ``observe(event)`` (:class:`KernelObserver`), registered
with :meth:`ServiceMetrics.add_observer <kernel.ServiceMetrics.add_observer>`.  Events
are delivered synchronously, on the trio thread, at the instant they happen; durations
are measured on the trio clock.  :class:`Observers` is the dispatcher the service uses:
an observer that raises is logged and ignored, one that takes long is logged, and
neither changes the batch.  Observers must be quick (no I/O: an exporter hands its
work to a thread of its own).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Literal, Protocol, runtime_checkable
from uuid import UUID

import attrs

from kernel._frozenmap import FrozenMap
from kernel._outcome_errors import AgentInvocationError
from kernel._types import AgentOutput, ConcurrentResult, ContextBundle

__all__ = [
    "AgentEnded",
    "AgentStarted",
    "BatchEnded",
    "BatchRefused",
    "BatchStarted",
    "BatchStopping",
    "HedgeEnded",
    "HedgeStarted",
    "KernelEvent",
    "KernelObserver",
    "RateLimitWaited",
]

log = logging.getLogger("kernel.observe")

#: An observer call longer than this is logged (it delays the batch it observes).
SLOW_OBSERVER_S = 0.005

_NO_METADATA: Mapping[str, str | int | float] = FrozenMap()


@attrs.frozen(slots=True)
class BatchStarted:
    """A batch was admitted and starts (the halt channel read clear just before)."""

    batch_id: UUID
    size: int
    mode: str


@attrs.frozen(slots=True)
class BatchRefused:
    """A call was refused before anything ran: ``why`` is ``"halted"`` or ``"capacity"``."""

    why: Literal["halted", "capacity"]
    reason: str


@attrs.frozen(slots=True)
class BatchStopping:
    """A batch is being stopped before every agent finished (the first cause only):
    ``cause`` is ``"halt"``, ``"deadline"`` or ``"quorum"``; ``reason`` a halt's reason
    when known at that instant."""

    batch_id: UUID
    cause: str
    reason: str | None


@attrs.frozen(slots=True)
class BatchEnded:
    """A batch ended with ``result`` (also when a halt cut it short: then ``halted``).

    ``stop``: the cause that stopped it early, if any.  ``halt_stop_s``: seconds from
    the halt being seen to the batch stopped, every agent ended (None without a halt).
    """

    batch_id: UUID
    result: ConcurrentResult
    halted: bool
    stop: str | None
    halt_stop_s: float | None


@attrs.frozen(slots=True)
class AgentStarted:
    """An agent's call starts.  Delivered in the trio task that makes the call, just
    before it, and that task makes no other agent's call: an observer may set context
    variables there (a current span) for the orchestrator to read.  ``context``: what
    the agent is asked (content: an observer records it only if told to)."""

    batch_id: UUID
    agent_id: str
    request_id: UUID
    context: ContextBundle | None = None


@attrs.frozen(slots=True)
class AgentEnded:
    """A started agent has its outcome: exactly one per :class:`AgentStarted`.

    ``outcome`` is ``"ok"`` or the :class:`~kernel.FailureKind` value; ``duration_s``
    from its start.  ``metadata`` is what the agent's own call reported: its output's
    metadata (also when that output is not its outcome: withheld by a halt, its commit
    failed), or the ``metadata`` of the :class:`~kernel.AgentInvocationError`
    it raised (empty otherwise, and when a hedge answered for it: the :class:`HedgeEnded`
    holds that).  ``hedge_won``: its duplicate call answered first.  ``output``: the output
    released (content: an observer records it only if told to).
    """

    batch_id: UUID
    agent_id: str
    request_id: UUID
    outcome: str
    duration_s: float
    error_type: str = ""
    metadata: Mapping[str, str | int | float] = _NO_METADATA
    hedge_won: bool = False
    output: AgentOutput | None = None


@attrs.frozen(slots=True)
class HedgeStarted:
    """A duplicate call of a slow agent starts (in its own task, just before the call)."""

    batch_id: UUID
    agent_id: str
    request_id: UUID


@attrs.frozen(slots=True)
class HedgeEnded:
    """A duplicate call ended: ``outcome`` ``"ok"`` (a valid answer, whether or not it
    came first), ``"error"`` (it raised, or answered something invalid) or
    ``"cancelled"`` (the other call won, or the batch stopped); ``metadata`` as in
    :class:`AgentEnded`."""

    batch_id: UUID
    agent_id: str
    request_id: UUID
    outcome: str
    duration_s: float
    metadata: Mapping[str, str | int | float] = _NO_METADATA


@attrs.frozen(slots=True)
class RateLimitWaited:
    """A call waited ``seconds`` for the service's :class:`~kernel.RateLimit`."""

    batch_id: UUID
    agent_id: str
    seconds: float


KernelEvent = (
    BatchStarted
    | BatchRefused
    | BatchStopping
    | BatchEnded
    | AgentStarted
    | AgentEnded
    | HedgeStarted
    | HedgeEnded
    | RateLimitWaited
)


@runtime_checkable
class KernelObserver(Protocol):
    """Sees a service's batches as they run (metrics, traces).  ``observe`` is called on
    the trio thread with each event; it must be quick and must not block."""

    def observe(self, event: KernelEvent) -> None: ...


class Observers:
    """The observers of one service, and the one place events are delivered to them
    (the service's; not for observers)."""

    __slots__ = ("_observers",)

    def __init__(self) -> None:
        self._observers: tuple[KernelObserver, ...] = ()

    def __bool__(self) -> bool:
        return bool(self._observers)

    def add(self, observer: KernelObserver) -> None:
        self._observers = (*self._observers, observer)

    def remove(self, observer: KernelObserver) -> None:
        self._observers = tuple(o for o in self._observers if o is not observer)

    def emit(self, event: KernelEvent) -> None:
        """Deliver ``event`` to every observer; errors are logged, never raised."""
        for observer in self._observers:
            began = time.perf_counter()
            try:
                observer.observe(event)
            except Exception:
                log.exception(
                    "kernel observer raised; ignored",
                    extra={"observer": type(observer).__name__, "event": type(event).__name__},
                )
            took = time.perf_counter() - began
            if took > SLOW_OBSERVER_S:
                log.warning(
                    "kernel observer is slow; it delays the batch it observes",
                    extra={
                        "observer": type(observer).__name__,
                        "event": type(event).__name__,
                        "took_ms": round(took * 1000.0, 3),
                    },
                )


class BatchEvents:
    """The events of one batch, built and delivered as it runs (only when the service has
    observers: a batch without them has none of this).  The service's; not for observers.

    It keeps what an event needs that the batch does not: the metadata of the agents'
    failed calls, the agents a hedge answered for, and when the halt was seen.
    """

    __slots__ = ("_call_meta", "_halt_seen", "_hedge_won", "_observers", "batch_id")

    def __init__(self, observers: Observers, batch_id: UUID) -> None:
        self._observers = observers
        self.batch_id = batch_id
        self._call_meta: dict[int, Mapping[str, str | int | float]] = {}
        self._hedge_won: set[int] = set()
        self._halt_seen: float | None = None

    def started(self, size: int, mode: str) -> None:
        self._observers.emit(BatchStarted(self.batch_id, size, mode))

    def stopping(self, cause: str, reason: str | None, now: float) -> None:
        if cause == "halt":
            self._halt_seen = now
        self._observers.emit(BatchStopping(self.batch_id, cause, reason))

    def ended(self, result: ConcurrentResult, halted: bool, stop: str | None, now: float) -> None:
        seen = self._halt_seen
        halt_stop_s = None if seen is None else max(now - seen, 0.0)
        self._observers.emit(BatchEnded(self.batch_id, result, halted, stop, halt_stop_s))

    def agent_started(self, agent_id: str, request_id: UUID, context: ContextBundle) -> None:
        self._observers.emit(AgentStarted(self.batch_id, agent_id, request_id, context))

    def call_failed(self, index: int, exc: BaseException) -> None:
        """Agent ``index``'s own call raised ``exc``: keep what it reports about itself."""
        metadata = getattr(exc, "metadata", None) if _reports(exc) else None
        if metadata:
            self._call_meta[index] = metadata

    def call_answered(self, index: int, output: AgentOutput) -> None:
        """Agent ``index``'s own call answered ``output``, which will not be its outcome
        (withheld by a stop, its commit failed, invalid): the call was made and paid for
        all the same, so its end event reports it."""
        if output.metadata:
            self._call_meta[index] = output.metadata

    def hedge_won(self, index: int) -> None:
        self._hedge_won.add(index)

    def agent_ended(
        self,
        index: int,
        agent_id: str,
        request_id: UUID,
        outcome: str,
        duration_s: float,
        error_type: str = "",
        output: AgentOutput | None = None,
    ) -> None:
        won = index in self._hedge_won
        if won:
            metadata = _NO_METADATA  # the hedge's call reported it
        elif output is not None:
            metadata = output.metadata
        else:
            metadata = self._call_meta.pop(index, _NO_METADATA)
        self._observers.emit(
            AgentEnded(
                self.batch_id,
                agent_id,
                request_id,
                outcome,
                max(duration_s, 0.0),
                error_type,
                metadata,
                won,
                output,
            )
        )

    def hedge_started(self, agent_id: str, request_id: UUID) -> None:
        self._observers.emit(HedgeStarted(self.batch_id, agent_id, request_id))

    def hedge_ended(
        self,
        agent_id: str,
        request_id: UUID,
        outcome: str,
        duration_s: float,
        metadata: Mapping[str, str | int | float] | None,
    ) -> None:
        self._observers.emit(
            HedgeEnded(
                self.batch_id,
                agent_id,
                request_id,
                outcome,
                max(duration_s, 0.0),
                _NO_METADATA if metadata is None else metadata,
            )
        )

    def rate_limit_waited(self, agent_id: str, seconds: float) -> None:
        self._observers.emit(RateLimitWaited(self.batch_id, agent_id, max(seconds, 0.0)))


def _reports(exc: BaseException) -> bool:
    # Only the kernel's own error type: its metadata is checked on the way in, and an
    # arbitrary exception's attributes are not read (a property of it could raise).
    return isinstance(exc, AgentInvocationError)
