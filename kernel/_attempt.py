"""One agent call, turned into exactly one outcome.

    invoke (or race a hedge) under the agent's timeout -> judge what came back
        -> stamp -> witness commit -> the outcome

What an orchestrator returns or raises is untrusted: an exception is an ``ERROR``, a
``trio.Cancelled`` nobody asked for is an ``ERROR``, anything but this agent's own
``AgentOutput`` is ``INVALID_OUTPUT``, a call past its timeout is a ``TIMEOUT`` (however it
ended).  A call that ends after its batch stopped has no outcome of its own: the stop
decides it (:data:`CUT_SHORT`), and an output it returned is never released
(:data:`WITHHELD`, not to the caller, not to the witness).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Awaitable, Mapping
from typing import Final, Protocol
from uuid import UUID

import trio

from kernel._cancel import cancel_requested, raise_if_requested
from kernel._metrics import ServiceMetrics
from kernel._outcome_errors import AgentInvocationError
from kernel._ports import AgentOrchestratorProtocol, OutputWitness
from kernel._resume import RESUMED
from kernel._slot import Slot
from kernel._tail import race
from kernel._types import AgentFailure, AgentOutput, AgentRequest, FailureKind, stamp_output
from kernel.events import BatchEvents

__all__ = [
    "CUT_SHORT",
    "NOT_STARTED",
    "WITHHELD",
    "AgentCall",
    "Attempted",
    "Cut",
    "Outcome",
    "Raised",
    "Run",
    "describe",
    "failure",
]


class Cut(enum.Enum):
    """An agent whose outcome is its batch's stop, not anything of its own."""

    #: The batch stopped before the agent started.
    NOT_STARTED = "not started"
    #: The call ended (with an error, or cancelled) after the batch stopped.
    CUT_SHORT = "cut short"
    #: The call returned an output after the batch stopped: it is never released.
    WITHHELD = "withheld"


NOT_STARTED: Final = Cut.NOT_STARTED
CUT_SHORT: Final = Cut.CUT_SHORT
WITHHELD: Final = Cut.WITHHELD

Outcome = AgentOutput | AgentFailure
Attempted = AgentOutput | AgentFailure | Cut


class Raised:
    """What an orchestrator call raised: an ``Exception``, or (None) a stray Cancelled."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc


#: What one orchestrator call came back with: what it returned (untrusted), or raised.
Answer = object


class Run(Protocol):
    """What an attempt needs of the batch it runs in."""

    @property
    def batch_id(self) -> UUID: ...
    @property
    def timeout(self) -> float | None: ...
    @property
    def hedge_delay(self) -> float | None: ...
    @property
    def output_ids(self) -> set[UUID]: ...
    @property
    def events(self) -> BatchEvents | None: ...

    def stop_if_due(self) -> bool: ...
    def withhold(self, index: int) -> None: ...
    async def take_hedge_slot(self, index: int) -> Slot | None: ...
    def release(self, slot: Slot) -> None: ...


class AgentCall:
    """A service's way of calling one agent (its orchestrator, witness and metrics)."""

    __slots__ = ("_metrics", "_orchestrator", "_witness")

    def __init__(
        self,
        orchestrator: AgentOrchestratorProtocol,
        witness: OutputWitness | None,
        metrics: ServiceMetrics,
    ) -> None:
        self._orchestrator = orchestrator
        self._witness = witness
        self._metrics = metrics

    @property
    def witness(self) -> OutputWitness | None:
        return self._witness

    async def attempt(self, run: Run, index: int, req: AgentRequest, start: float) -> Attempted:
        """Invoke one agent (started at ``start``) and return exactly one outcome, or the
        :class:`Cut` that says its batch's stop decides it.  A cancellation the kernel
        asked for propagates."""
        # The single call is awaited here, not through invoke(): one coroutine less per
        # agent on the hot path.
        call: Awaitable[Answer] = (
            self._orchestrator.invoke(req.agent_id, req.context)
            if run.hedge_delay is None
            else self._hedged(run, index, req, start + run.hedge_delay)
        )
        timeout = run.timeout
        scope = None
        answer: Answer
        try:
            if timeout is None:
                # No timeout: no cancel scope either (per-agent cost on the hot path).
                answer = await call
            else:
                with trio.CancelScope(deadline=start + timeout) as scope:
                    answer = await call
        except Exception as raised:
            answer = Raised(raised)
            if run.events is not None:
                run.events.call_failed(index, raised)
        except trio.Cancelled as exc:
            raise_if_requested(exc)
            answer = Raised(None)  # a Cancelled nobody asked for
        if scope is not None and (scope.cancel_called or trio.current_time() >= scope.deadline):
            # Cancelled by its timeout (perhaps turned into an error), or it returned too
            # late: either way, a timeout.
            message = f"agent exceeded its timeout of {timeout:g} s"
            return failure(req, FailureKind.TIMEOUT, "", message, start)
        if (
            answer.__class__ is AgentOutput
            and not run.stop_if_due()
            and answer.agent_id == req.agent_id
            and answer.output_id not in run.output_ids
            and RESUMED not in answer.metadata
        ):
            # The common case, without a call: this agent's own, fresh output.
            run.output_ids.add(answer.output_id)
            judged: Attempted = stamp_output(answer, req.request_id, run.batch_id)
        else:
            _answered(run, index, answer)
            judged = self._judge(run, index, req, answer, start)
        if self._witness is None or judged.__class__ is not AgentOutput:
            return judged
        assert isinstance(judged, AgentOutput)
        return await self._commit(self._witness, run, index, req, judged, start)

    def _judge(
        self, run: Run, index: int, req: AgentRequest, answer: Answer, start: float
    ) -> Attempted:
        # Whatever comes back after the batch stopped is cut short by that stop: an output
        # is withheld (the orchestrator returned in the same instant as a halt, or
        # swallowed its cancellation), and an error is the stop's cancellation turned into
        # an exception, as a timeout's is above.
        if run.stop_if_due():
            if isinstance(answer, AgentOutput):
                run.withhold(index)
                return WITHHELD
            return CUT_SHORT
        if isinstance(answer, Raised):
            if answer.exc is None:
                message = (
                    "orchestrator raised a trio.Cancelled that no halt, timeout or caller asked for"
                )
                return failure(req, FailureKind.ERROR, "Cancelled", message, start)
            error = answer.exc
            return failure(req, FailureKind.ERROR, type(error).__name__, describe(error), start)
        problem = invalid(answer, req)
        if isinstance(answer, AgentOutput) and answer.output_id in run.output_ids:
            problem = problem or (
                f"orchestrator returned output {answer.output_id} for agent "
                f"{req.agent_id!r}, an output id another agent of this batch already has"
            )
        if problem is not None or not isinstance(answer, AgentOutput):
            return failure(req, FailureKind.INVALID_OUTPUT, "", problem or "", start)
        run.output_ids.add(answer.output_id)
        return stamp_output(answer, req.request_id, run.batch_id)

    async def _commit(
        self,
        witness: OutputWitness,
        run: Run,
        index: int,
        req: AgentRequest,
        output: AgentOutput,
        start: float,
    ) -> Attempted:
        # Cancellable: a halt during the commit withholds the output, and the witness
        # promises never to write it.  A commit past its point of no return returns
        # normally, and the output is released: the log and the result agree.
        try:
            await witness.commit(output)
        except Exception as exc:
            _answered(run, index, output)  # not released: its end event reports the call
            message = f"witness commit failed: {describe(exc)}"
            return failure(req, FailureKind.WITNESS, type(exc).__name__, message, start)
        except trio.Cancelled:
            _answered(run, index, output)
            if cancel_requested():
                run.withhold(index)  # and the witness never writes it
                raise
            message = "witness commit was cancelled"
            return failure(req, FailureKind.WITNESS, "Cancelled", message, start)
        return output

    async def invoke(self, req: AgentRequest) -> Answer:
        """One orchestrator call: what it returned, or what it raised as a :class:`Raised`."""
        try:
            return await self._orchestrator.invoke(req.agent_id, req.context)
        except Exception as exc:
            return Raised(exc)
        except trio.Cancelled as exc:
            raise_if_requested(exc)
            return Raised(None)  # a Cancelled nobody asked for

    async def _hedged(self, run: Run, index: int, req: AgentRequest, hedge_at: float) -> Answer:
        """The agent's call raced against one duplicate started at ``hedge_at``."""
        events = run.events
        if events is None:
            return await race(
                functools.partial(self.invoke, req),
                functools.partial(_wins, req=req),
                hedge_at,
                functools.partial(run.take_hedge_slot, index),
                run.release,
                self._metrics.record_hedge_won,
            )
        return await race(
            functools.partial(self._first_observed, events, index, req),
            functools.partial(_wins, req=req),
            hedge_at,
            functools.partial(run.take_hedge_slot, index),
            run.release,
            functools.partial(self._hedge_won, events, index),
            functools.partial(self._hedge_observed, events, req),
        )

    async def _first_observed(self, events: BatchEvents, index: int, req: AgentRequest) -> Answer:
        """The agent's own call in a race, what it raised kept for its end event."""
        answer = await self.invoke(req)
        if isinstance(answer, Raised) and answer.exc is not None:
            events.call_failed(index, answer.exc)
        return answer

    def _hedge_won(self, events: BatchEvents, index: int) -> None:
        self._metrics.record_hedge_won()
        events.hedge_won(index)

    async def _hedge_observed(self, events: BatchEvents, req: AgentRequest) -> Answer:
        """A duplicate call, its end told to the observers however it ends."""
        start = trio.current_time()
        outcome = "cancelled"
        metadata: Mapping[str, str | int | float] | None = None
        try:
            answer = await self.invoke(req)
            if isinstance(answer, Raised):
                outcome = "error"
                exc = answer.exc
                metadata = exc.metadata if isinstance(exc, AgentInvocationError) else None
            elif isinstance(answer, AgentOutput) and invalid(answer, req) is None:
                outcome, metadata = "ok", answer.metadata
            else:
                outcome = "error"
            return answer
        finally:
            duration = trio.current_time() - start
            events.hedge_ended(req.agent_id, req.request_id, outcome, duration, metadata)


def _wins(answer: Answer, *, req: AgentRequest) -> bool:
    return invalid(answer, req) is None


def invalid(answer: Answer, req: AgentRequest) -> str | None:
    """Why ``answer`` is not a valid output of ``req``'s agent, or None if it is."""
    if isinstance(answer, Raised):
        return "the call raised"
    if not isinstance(answer, AgentOutput):
        return f"orchestrator returned {type(answer).__name__}, expected AgentOutput"
    if answer.agent_id != req.agent_id:
        return (
            f"orchestrator returned an output of agent {answer.agent_id!r} "
            f"for agent {req.agent_id!r}"
        )
    if RESUMED in answer.metadata:  # the kernel's mark of an answer taken from the log
        return (
            f"orchestrator returned an output with metadata key {RESUMED!r}, which marks an "
            "answer a resume took from the witness log"
        )
    return None


def describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else repr(exc)


def failure(
    req: AgentRequest, kind: FailureKind, error_type: str, message: str, start: float
) -> AgentFailure:
    """``req``'s agent failed: ``kind``, timed from ``start`` to now."""
    return AgentFailure(
        agent_id=req.agent_id,
        request_id=req.request_id,
        kind=kind,
        error_type=error_type,
        message=message,
        elapsed_ms=max((trio.current_time() - start) * 1000.0, 0.0),
    )


def _answered(run: Run, index: int, answer: object) -> None:
    """The call answered an output that will not be its outcome: the observers are told
    what the call reported (it was made and paid for all the same)."""
    if run.events is not None and isinstance(answer, AgentOutput):
        run.events.call_answered(index, answer)
