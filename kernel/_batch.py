"""One batch run: scheduling its agents, how it stops, and its result.

    run: listen for a halt, watch the deadline -> schedule (reject / queue / sequential)
         -> per agent: start (unless stopped) -> attempt -> record -> report
    result: every request's outcome; those the batch's stop cut short get the stop's

A batch stops for one of three causes (:class:`Stop`), and :meth:`Batch.stop` is the one
place that stops it: the first cause wins, the agents' scope is cancelled at once.
:meth:`Batch.is_stopped` only asks; :meth:`Batch.stop_if_due` asks and acts, for the
instants where a halt seen through the channel's probe or a deadline just passed must
stop the batch before the task watching for it wakes up.
"""

from __future__ import annotations

import enum
import functools
import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Literal
from uuid import UUID, uuid4

import trio

from kernel._attempt import NOT_STARTED, AgentCall, Attempted, Cut, Outcome, failure
from kernel._cancel import surface
from kernel._errors import AgentPoolExhaustedError
from kernel._halt_watch import HaltWatch
from kernel._halt_watch import failed as halt_failed
from kernel._metrics import ServiceMetrics
from kernel._pool import Admission
from kernel._progress import Progress, ProgressCallback
from kernel._rate import RateLimit
from kernel._slot import Slot
from kernel._tail import LatencyWindow, watch_deadline
from kernel._types import (
    AgentFailure,
    AgentOutput,
    AgentRequest,
    ConcurrentResult,
    FailureKind,
    utc_now,
)
from kernel.events import BatchEvents

__all__ = ["Batch", "Mode", "ProgressCallback", "Stop"]

log = logging.getLogger("kernel.service")

Mode = Literal["reject", "queue", "sequential"]

_MAX_LOGGED_MESSAGE = 200


class Stop(enum.Enum):
    """Why a batch stopped before every agent finished."""

    HALT = "halt"
    DEADLINE = "deadline"
    QUORUM = "quorum"


class Batch:
    """One running batch: its requests, their outcomes so far, and how it stops."""

    __slots__ = (
        "admission", "batch_id", "begin_run", "call", "cause", "deadline", "done", "events",
        "halt", "hedge_delay", "hedged", "hedges_left", "latencies", "metrics", "mode",
        "outcomes", "output_ids", "pending", "probe", "progress", "quorum", "rate_limit",
        "reason", "reporting", "requests", "run_scope", "started", "succeeded", "timeout",
        "withheld",
    )  # fmt: skip

    def __init__(
        self,
        requests: list[AgentRequest],
        mode: Mode,
        timeout: float | None,
        on_progress: ProgressCallback | None,
        *,
        call: AgentCall,
        halt: HaltWatch,
        metrics: ServiceMetrics,
        rate_limit: RateLimit | None = None,
        latencies: LatencyWindow | None = None,
        batch_id: UUID | None = None,
    ) -> None:
        self.batch_id: UUID = uuid4() if batch_id is None else batch_id
        self.requests = requests
        self.mode = mode
        self.timeout = timeout
        self.call, self.halt, self.metrics = call, halt, metrics
        self.rate_limit, self.latencies = rate_limit, latencies
        self.outcomes: list[Outcome | None] = [None] * len(requests)
        self.started: list[float | None] = [None] * len(requests)
        self.done = 0
        self.succeeded = 0
        self.output_ids: set[UUID] = set()
        # The agents this run invokes, by index: all of them, unless it resumes a batch.
        self.pending: list[int] = list(range(len(requests)))
        # Starts recording the run in the batch's log (a BatchLog witness); returns the
        # function that ends it.
        self.begin_run: Callable[[], Callable[[], None]] | None = None
        self.admission: Admission | None = None
        # Tail control (see _tail.py): all off unless the call asks.
        self.deadline: float | None = None  # absolute, trio clock
        self.quorum: int | None = None
        self.hedge_delay: float | None = None
        # The hedge budget not yet taken: a hedge takes its share before it may start,
        # and gives it back if it never does.
        self.hedges_left = 0
        self.hedged: set[int] = set()
        # The scope every agent runs in: a halt, the deadline or the quorum cancels it.
        self.run_scope = trio.CancelScope()
        self.cause: Stop | None = None
        self.reason: str | None = None  # the halt reason
        # Agents whose output arrived after the stop: it is never released.
        self.withheld: set[int] = set()
        self.reporting = on_progress is not None
        self.probe = halt.halted_now  # decided once: asked twice per agent
        self.progress = Progress(on_progress, self.batch_id, len(requests), mode == "sequential")
        # Decided once: a service without observers builds no event at all.
        self.events = BatchEvents(metrics.observers, self.batch_id) if metrics.observers else None

    # ------------------------------------------------------------ stopping

    def stop(self, cause: Stop, reason: str | None = None) -> None:
        """Stop everything: the first cause wins (a halt's reason may come later)."""
        if self.cause is None:
            self.cause = cause
            if self.events is not None:
                self.events.stopping(cause.value, reason, trio.current_time())
        if cause is Stop.HALT and self.cause is Stop.HALT and self.reason is None:
            self.reason = reason
        self.run_scope.cancel()
        if cause is not Stop.QUORUM:
            # Nothing slow between a halt and the caller, nor past the batch's deadline:
            # async reports still running are cut (their callback was called).
            self.progress.cancel()

    def is_stopped(self) -> bool:
        """Has this batch stopped, or is a stop due (a halt the probe sees, a deadline
        just passed)?  Only asks: no checkpoint, no change."""
        return (
            self.cause is not None
            or self.halt.probe() is not False
            or (self.deadline is not None and trio.current_time() >= self.deadline)
        )

    def stop_if_due(self) -> bool:
        """Stop the batch if a stop is due (see :meth:`is_stopped`); whether it stopped.

        Asked twice per agent (before its start, when its call ends): kept to the fewest
        calls."""
        if self.cause is not None:
            return True
        probe = self.probe
        if probe is not None:
            # HaltWatch.probe inlined (a call less, twice per agent); same rule: a probe
            # that raises is a halt.
            try:
                halted = probe()
            except Exception as exc:
                self.stop(Stop.HALT, halt_failed(exc))
                return True
            if halted:
                self.stop(Stop.HALT)
                return True
        if self.deadline is not None and trio.current_time() >= self.deadline:
            self.stop(Stop.DEADLINE)
            return True
        return False

    def resume(self, outputs: Mapping[int, AgentOutput]) -> None:
        """Agents that already have a committed output (by index): they are outcomes of
        this batch, not run again, and count towards its quorum."""
        for index, output in outputs.items():
            self.outcomes[index] = output
            self.output_ids.add(output.output_id)
        self.done = self.succeeded = len(outputs)
        self.pending = [i for i, outcome in enumerate(self.outcomes) if outcome is None]

    def withhold(self, index: int) -> None:
        """Agent ``index``'s output arrived after the stop: it is never released."""
        self.withheld.add(index)

    # ------------------------------------------------------------ running

    async def run(self, admission: Admission) -> None:
        """Run the batch's agents in one nursery, under a scope a stop cancels."""
        self.admission = admission
        if self.events is not None:
            self.events.started(len(self.requests), self.mode)
        # A channel that can call back stops the batch from inside its halt(), so not
        # even a commit finishing in the same instant is released after it.
        stop_listening = self.halt.listen(functools.partial(self.stop, Stop.HALT))
        end_run = self.begin_run() if self.begin_run is not None else None
        try:
            # The reports of recorded outcomes run outside the run scope: a stop that
            # comes after an outcome was recorded (the quorum it completes, a halt in the
            # same instant) must not cut its report short.
            async with (
                trio.open_nursery() as self.progress.reports,
                trio.open_nursery() as watchers,
            ):
                if self.halt.checker is not None:
                    watchers.start_soon(self._watch_halt)
                if self.deadline is not None:
                    stop = functools.partial(self.stop, Stop.DEADLINE)
                    watchers.start_soon(watch_deadline, self.deadline, stop)
                with self.run_scope:
                    if self.quorum is not None and self.succeeded >= self.quorum:
                        self.stop(Stop.QUORUM)  # the resumed outputs already reach it
                    else:
                        await self._schedule(admission)
                watchers.cancel_scope.cancel()
                if self.deadline is not None:
                    # The run is over; reports still running end by the deadline too.
                    self.progress.reports.cancel_scope.deadline = self.deadline
        except BaseExceptionGroup as group:
            raise surface(group) from None
        finally:
            if end_run is not None:
                end_run()
            if stop_listening is not None:
                stop_listening()

    async def _watch_halt(self) -> None:
        self.stop(Stop.HALT, await self.halt.wait())

    async def _schedule(self, admission: Admission) -> None:
        if self.mode == "sequential":
            await self._run_in_turn(admission)
            return
        async with trio.open_nursery() as agents:
            if self.mode == "reject":
                for index, slot in zip(self.pending, admission.slots, strict=True):
                    agents.start_soon(self._run_agent, index, slot)
            else:
                await self._feed_queue(agents, admission)

    async def _feed_queue(self, agents: trio.Nursery, admission: Admission) -> None:
        # The slots free now, with their shared leases in one call (granted or queued
        # FIFO): admitting a batch costs one round trip to a shared store, not one per
        # agent.  Refused (the store unreachable): nothing started, the batch is refused.
        await admission.take_ahead([req.agent_id for req in self.requests])
        # Take each slot *before* spawning the agent's task: a queue of thousands of
        # agents costs thousands of waiting requests, not thousands of parked tasks.
        for position, index in enumerate(self.pending):
            try:
                slot = await admission.take_slot(self.requests[index].agent_id)
            except AgentPoolExhaustedError as exc:
                if position == 0:
                    raise  # nothing started: the batch is refused, as in reject mode
                # The capacity went away mid-batch (a shared one became unreachable): the
                # agents not started yet fail with the reason, the running ones finish.
                self._not_admitted(position, exc)
                return
            agents.start_soon(self._run_agent, index, slot)

    def _not_admitted(self, first: int, exc: AgentPoolExhaustedError) -> None:
        now = trio.current_time()
        for index in self.pending[first:]:
            req, message = self.requests[index], f"not started: {exc}"
            self._record(
                index, failure(req, FailureKind.ERROR, type(exc).__name__, message, now), now
            )

    async def _run_in_turn(self, admission: Admission) -> None:
        for index in self.pending:
            req = self.requests[index]
            reason = await self.halt.read()  # before every turn
            if reason is not None:
                self.stop(Stop.HALT, reason)
                return
            await self.progress.starting(self.done, req.agent_id)
            slot = await admission.take_slot(req.agent_id)
            # Each agent in a task of its own, as in the other modes: what its call sets
            # in its context (an observer's current span) ends with it.
            async with trio.open_nursery() as turn:
                turn.start_soon(self._run_agent, index, slot)

    async def _run_agent(self, index: int, slot: Slot) -> None:
        assert self.admission is not None
        try:
            if slot.lease is None:
                outcome = await self._start(index)
            else:
                outcome = await self._start_leased(index, slot)
        finally:
            self.admission.release(slot)
        if isinstance(outcome, Cut):  # the batch's stop decides this agent's outcome
            return
        # Recorded with no checkpoint since the attempt's stop check: what is recorded as
        # a success was released before any halt.
        start = self.started[index]
        self._record(index, outcome, trio.current_time() if start is None else start)
        if self.reporting:
            completed = isinstance(outcome, AgentOutput)
            await self.progress.outcome(self.done, outcome.agent_id, completed)

    async def _start(self, index: int) -> Attempted:
        """Start one agent (unless the batch stopped) and run its attempt."""
        if self.stop_if_due():  # nothing starts after a halt, deadline or quorum
            return NOT_STARTED
        req = self.requests[index]
        if self.rate_limit is not None:
            await self._wait_for_rate(req.agent_id)
            if self.stop_if_due():
                return NOT_STARTED
        start = trio.current_time()
        self.started[index] = start
        self.metrics.record_started()
        if self.events is not None:
            self.events.agent_started(req.agent_id, req.request_id, req.context)
        return await self.call.attempt(self, index, req, start)

    async def _wait_for_rate(self, agent_id: str) -> None:
        assert self.rate_limit is not None
        if self.events is None:
            await self.rate_limit.acquire()
            return
        began = trio.current_time()
        try:
            await self.rate_limit.acquire()
        finally:  # a wait a stop cut short was waited all the same
            self.events.rate_limit_waited(agent_id, trio.current_time() - began)

    async def _start_leased(self, index: int, slot: Slot) -> Attempted:
        """:meth:`_start` on a shared lease: if the lease is lost, the agent is cancelled
        and fails (an output it returned all the same stands; a stop of the batch decides
        as ever)."""
        outcome: Attempted = NOT_STARTED
        if slot.lost is None:
            with slot.guard():
                outcome = await self._start(index)
        if slot.lost is None or isinstance(outcome, AgentOutput) or self.cause is not None:
            return outcome
        req, start = self.requests[index], self.started[index]
        message = f"shared capacity lease lost: {slot.lost}"
        if start is None:
            now = trio.current_time()
            return failure(req, FailureKind.ERROR, "", f"not started: {message}", now)
        return failure(req, FailureKind.ERROR, "", message, start)

    async def take_hedge_slot(self, index: int) -> Slot | None:
        """Take what a hedge of agent ``index`` needs to start: a share of the budget, a
        slot (and its shared lease), the rate limit's turn.  None (everything given back)
        if it may not start: no budget or slot left, or the batch stopped meanwhile."""
        if self.hedges_left <= 0:
            return None
        # Taken here, before the first checkpoint (the shared lease, the rate limit): the
        # hedges due in the same tick all pass the check above before any of them gets
        # past an await, so a share taken after one would let every one of them through.
        self.hedges_left -= 1
        admission = self.admission
        assert admission is not None
        slot: Slot | None = None
        try:
            slot = await admission.take_extra_slot(self.requests[index].agent_id)
            if slot is not None and self.rate_limit is not None:
                await self._wait_for_rate(self.requests[index].agent_id)
        except BaseException:
            self._give_back_hedge(slot)
            raise
        if slot is None or self.stop_if_due():
            self._give_back_hedge(slot)
            return None
        self.hedged.add(index)
        self.metrics.record_hedge_launched()
        if self.events is not None:
            req = self.requests[index]
            self.events.hedge_started(req.agent_id, req.request_id)
        return slot

    def _give_back_hedge(self, slot: Slot | None) -> None:
        self.hedges_left += 1
        if slot is not None:
            self.release(slot)

    def release(self, slot: Slot) -> None:
        assert self.admission is not None
        self.admission.release(slot)

    def _record(self, index: int, outcome: Outcome, start: float) -> None:
        self.outcomes[index] = outcome
        self.done += 1
        if self.events is not None and self.started[index] is not None:
            self._ended(index, outcome, trio.current_time())
        if isinstance(outcome, AgentOutput):
            if self.latencies is not None:
                self.latencies.append(trio.current_time() - start)
            self.succeeded += 1
            if self.quorum is not None and self.succeeded >= self.quorum:
                self.stop(Stop.QUORUM)
            return
        log.warning(
            "agent failed",
            extra={
                "batch_id": str(self.batch_id),
                "agent_id": outcome.agent_id,
                "request_id": str(outcome.request_id),
                "failure_kind": outcome.kind.value,
                "error_type": outcome.error_type,
                "error_message": outcome.message[:_MAX_LOGGED_MESSAGE],
                "elapsed_ms": round(outcome.elapsed_ms, 3),
            },
        )

    # ------------------------------------------------------------ the result

    @property
    def halted(self) -> bool:
        """Did a halt cut this batch short (some agent has no outcome of its own)?"""
        return self.cause is Stop.HALT and self.done < len(self.requests)

    def result(self, started_at: datetime, t0: float) -> ConcurrentResult:
        """Every request's outcome, in request order: those without one get their stop's."""
        now = trio.current_time()
        if self.done < len(self.requests):
            for i, outcome in enumerate(self.outcomes):
                if outcome is None:
                    cut = self.outcomes[i] = self._unfinished(i, now)
                    if self.events is not None and self.started[i] is not None:
                        self._ended(i, cut, now)
        outputs = tuple(o for o in self.outcomes if isinstance(o, AgentOutput))
        failures = tuple(o for o in self.outcomes if isinstance(o, AgentFailure))
        result = ConcurrentResult(
            batch_id=self.batch_id,
            outputs=outputs,
            failures=failures,
            started_at=started_at,
            completed_at=utc_now(),
            total_ms=max((now - t0) * 1000.0, 0.0),
            hedged_agents=tuple(self.requests[i].agent_id for i in sorted(self.hedged)),
        )
        self.metrics.record_result(result, halted=self.halted)
        if self.events is not None and self.admission is not None:
            cause = None if self.cause is None else self.cause.value
            self.events.ended(result, self.halted, cause, now)
        log.info(
            "batch finished",
            extra={
                "batch_id": str(self.batch_id),
                "mode": self.mode,
                "batch_size": len(self.requests),
                "success_count": len(outputs),
                "failure_count": len(failures),
                "total_ms": round(result.total_ms, 3),
            },
        )
        return result

    def _ended(self, index: int, outcome: Outcome, now: float) -> None:
        """Tell the observers agent ``index`` (started) has its outcome."""
        assert self.events is not None
        req, start = self.requests[index], self.started[index]
        duration = 0.0 if start is None else now - start
        if isinstance(outcome, AgentOutput):
            self.events.agent_ended(
                index, req.agent_id, req.request_id, "ok", duration, "", outcome
            )
        else:
            self.events.agent_ended(
                index, req.agent_id, req.request_id, outcome.kind.value, duration,
                outcome.error_type,
            )  # fmt: skip

    def _unfinished(self, i: int, now: float) -> AgentFailure:
        req, started = self.requests[i], self.started[i]
        kind, why, cut = _STOPPED[self.cause or Stop.QUORUM]
        if self.cause is Stop.HALT:
            why = f"{why} ({self.reason})"
        elif self.cause is Stop.QUORUM or self.cause is None:
            why, cut = why.format(self.quorum), cut.format(self.quorum)
        if started is None:
            message = f"not started: {why}"
        elif i in self.withheld:
            message = f"output withheld: {why} before its release"
        elif kind is FailureKind.HALTED:
            message = f"{cut} ({self.reason})"
        else:
            message = cut
        return AgentFailure(
            agent_id=req.agent_id,
            request_id=req.request_id,
            kind=kind,
            error_type="",
            message=message,
            elapsed_ms=0.0 if started is None else max((now - started) * 1000.0, 0.0),
        )


#: What each stop makes of an agent it cut short: kind, why (not started / withheld),
#: and what happened to a running call.
_STOPPED: dict[Stop, tuple[FailureKind, str, str]] = {
    Stop.HALT: (FailureKind.HALTED, "system halted", "cancelled by halt"),
    Stop.DEADLINE: (FailureKind.TIMEOUT, "batch deadline reached", "batch deadline reached"),
    Stop.QUORUM: (
        FailureKind.CANCELLED,
        "quorum of {} reached",
        "not needed: quorum of {} reached",
    ),
}
