"""The deliberation service: many agents, one topic, structured concurrency.

The data path of a batch reads straight down this module:

    request -> halt check -> validate -> admit -> run under the limiter
            -> check & stamp -> (witness) -> outcome -> result

Every request ends in exactly one outcome, every slot comes back, and a halt cancels
everything in flight at once.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from datetime import datetime
from typing import Any, Literal, NamedTuple
from uuid import UUID, uuid4

import trio

from kernel._errors import (
    AgentPoolExhaustedError,
    InvalidRequestError,
)
from kernel._halt import (
    DEFAULT_HALT_READ_TIMEOUT,
    NO_REASON,
    check_sync_hooks,
    read_halt,
    wait_for_halt,
)
from kernel._metrics import ServiceMetrics
from kernel._outcome_errors import AgentInvocationError, SystemHaltedError
from kernel._pool import Admission, AgentPool, Slot
from kernel._ports import (
    AgentOrchestratorProtocol,
    HaltChecker,
    HaltNotifier,
    HaltProbe,
    HaltWaiter,
    OutputWitness,
)
from kernel._rate import RateLimit
from kernel._tail import (
    HedgePolicy,
    LatencyWindow,
    check_deadline,
    check_hedge,
    check_quorum,
)
from kernel._types import (
    AgentFailure,
    AgentOutput,
    AgentRequest,
    ConcurrentResult,
    FailureKind,
    PoolStatus,
    stamp_output,
    utc_now,
)
from kernel.validate import check_seconds

__all__ = ["ConcurrentDeliberationService", "Overflow", "ProgressCallback"]

log = logging.getLogger("kernel.service")

Overflow = Literal["reject", "queue"]
#: ``on_progress(done, total, agent_id, status)``; status is "completed", "failed"
#: or (sequential mode, before each turn) "starting".
ProgressCallback = Callable[[int, int, str, str], object]
_Mode = Literal["reject", "queue", "sequential"]
_Outcome = AgentOutput | AgentFailure


class _Tail(NamedTuple):
    """A call's tail control, before validation."""

    deadline: object
    quorum: object
    hedge: object


_MAX_LOGGED_MESSAGE = 200


# ---------------------------------------------------------------- validation


def _check_timeout(value: object) -> float | None:
    return None if value is None else check_seconds(value, "agent_timeout")


def _check_requests(requests: object) -> list[AgentRequest]:
    if isinstance(requests, str | bytes | AgentRequest) or not isinstance(requests, Iterable):
        raise InvalidRequestError(
            f"requests must be a sequence of AgentRequest, got {type(requests).__name__}"
        )
    checked = list(requests)
    seen_agents: set[str] = set()
    seen_requests: set[UUID] = set()
    for i, req in enumerate(checked):
        if not isinstance(req, AgentRequest):
            raise InvalidRequestError(
                f"requests[{i}] must be an AgentRequest, got {type(req).__name__}"
            )
        if req.agent_id in seen_agents:
            raise InvalidRequestError(
                f"agent ids must be distinct within a batch: {req.agent_id!r} appears twice"
            )
        if req.request_id in seen_requests:
            raise InvalidRequestError(f"request ids must be distinct: {req.request_id} repeats")
        seen_agents.add(req.agent_id)
        seen_requests.add(req.request_id)
    return checked


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return text if text else repr(exc)


def _check_progress(on_progress: ProgressCallback | None) -> ProgressCallback | None:
    if on_progress is not None and not callable(on_progress):
        raise InvalidRequestError(
            f"on_progress must be a callable or an async function, got {type(on_progress).__name__}"
        )
    # A generator function's call runs none of its body: it would be silently ignored.
    call = getattr(on_progress, "__call__", None)  # noqa: B004 - the method, for objects
    if any(
        inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (on_progress, call)
    ):
        raise InvalidRequestError(
            "on_progress must be a callable or an async function, not a generator function "
            "(its body would never run)"
        )
    return on_progress


def _cancel_requested() -> bool:
    """True if some cancel scope around this task has been cancelled.

    A ``trio.Cancelled`` that arrives while this is False was not asked for by anyone
    (not a halt, not a timeout, not the caller): an orchestrator made it up or let one
    of its own escape, and it is that agent's error, not a cancellation.
    """
    return trio.current_effective_deadline() == -math.inf


# ---------------------------------------------------------------- one batch

#: Why a batch stopped before every agent finished.
_Stop = Literal["halt", "deadline", "quorum"]


class _Raised:
    """What an orchestrator call raised: an ``Exception``, or (None) a stray Cancelled."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception | None) -> None:
        self.exc = exc


class _Batch:
    """The mutable state of one running batch (private to the service)."""

    __slots__ = (
        "admission",
        "batch_id",
        "deadline",
        "done",
        "hedge_delay",
        "hedged",
        "hedges_left",
        "mode",
        "on_progress",
        "outcomes",
        "output_ids",
        "quorum",
        "reason",
        "reports",
        "requests",
        "run_scope",
        "started",
        "stop",
        "succeeded",
        "timeout",
        "withheld",
    )

    def __init__(
        self,
        requests: list[AgentRequest],
        mode: _Mode,
        timeout: float | None,
        on_progress: ProgressCallback | None,
    ) -> None:
        self.batch_id = uuid4()
        self.requests = requests
        self.mode = mode
        self.timeout = timeout
        self.on_progress = on_progress
        self.outcomes: list[_Outcome | None] = [None] * len(requests)
        self.started: list[float | None] = [None] * len(requests)
        self.done = 0
        self.succeeded = 0
        self.output_ids: set[UUID] = set()
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
        self.stop: _Stop | None = None
        self.reason: str | None = None  # the halt reason
        # Agents whose output arrived after the stop: it is never released.
        self.withheld: set[int] = set()
        # Where async on_progress reports of outcomes run: outside the run scope (set by
        # _run), so that a quorum or a deadline reached right after an outcome was
        # recorded does not cut its report short.  A halt does: it cancels everything in
        # flight, the caller's own slow callbacks included.
        self.reports: trio.Nursery | None = None

    def stop_now(self, stop: _Stop, reason: str | None = None) -> None:
        """Stop everything: the first cause wins (a halt's reason may come later)."""
        if self.stop is None:
            self.stop = stop
        if stop == "halt" and self.stop == "halt" and self.reason is None:
            self.reason = reason
        self.run_scope.cancel()
        if stop == "halt" and self.reports is not None:
            self.reports.cancel_scope.cancel()  # nothing slow between a halt and the caller

    def fill_unfinished(self, now: float) -> None:
        """Give every request that has no outcome the failure its batch's stop calls for."""
        for i, outcome in enumerate(self.outcomes):
            if outcome is None:
                self.outcomes[i] = self._unfinished(i, now)

    def _unfinished(self, i: int, now: float) -> AgentFailure:
        req, started = self.requests[i], self.started[i]
        if self.stop == "halt":
            kind, why, cut = (
                FailureKind.HALTED,
                f"system halted ({self.reason})",
                "cancelled by halt",
            )
        elif self.stop == "deadline":
            kind, why, cut = FailureKind.TIMEOUT, "batch deadline reached", "batch deadline reached"
        else:
            kind, why = FailureKind.CANCELLED, f"quorum of {self.quorum} reached"
            cut = f"not needed: quorum of {self.quorum} reached"
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


# ---------------------------------------------------------------- the service


class ConcurrentDeliberationService:
    """Runs a council of agents on one topic, concurrently, under FR10 and CT-11.

    Args:
        orchestrator: runs one agent (:class:`AgentOrchestratorProtocol`, trio-native).
        halt_checker: the halt channel; ``None`` means the service is never halted.
            One with ``wait_halted`` is waited on; otherwise it is polled every
            ``halt_poll_interval`` seconds during a batch.  A read that raises, or that
            does not answer within ``halt_read_timeout`` seconds, counts as a halt
            (fail-safe).
        pool: the :class:`AgentPool` to admit into; share one pool between services to
            bound them together.  Default: a new pool of 72.
        agent_timeout: default per-agent timeout in seconds (None: no timeout).  It counts
            from the agent's start: time spent queued for a slot is not charged to it.
        witness: an :class:`OutputWitness`; when set, no output is released before its
            commit succeeded.
        deadline, hedge: defaults for :meth:`invoke_concurrent`'s tail control.
        rate_limit: a :class:`RateLimit` every call waits for before it starts (agents
            and hedges; their timeouts count from after the wait).

    Agent failures never raise: they are returned in the result and logged.  The
    methods raise only for bad input (:class:`InvalidRequestError`), refused admission
    (:class:`AgentPoolExhaustedError` / :class:`AgentBusyError`), and halt
    (:class:`SystemHaltedError`); outer cancellation and ``BaseException``s propagate.

    Once a halt is seen, nothing is released: an output that arrives after it (the
    orchestrator finished in the same instant, or swallowed the cancellation) is a
    ``HALTED`` failure, and is never committed to the witness.  A ``trio.Cancelled``
    that nobody asked for, leaking out of an orchestrator, is that agent's ``ERROR``.
    """

    def __init__(
        self,
        orchestrator: AgentOrchestratorProtocol,
        halt_checker: HaltChecker | None = None,
        pool: AgentPool | None = None,
        *,
        agent_timeout: float | None = None,
        halt_poll_interval: float = 0.05,
        halt_read_timeout: float = DEFAULT_HALT_READ_TIMEOUT,
        witness: OutputWitness | None = None,
        deadline: float | None = None,
        hedge: HedgePolicy | None = None,
        rate_limit: RateLimit | None = None,
    ) -> None:
        if not callable(getattr(orchestrator, "invoke", None)):
            raise InvalidRequestError(
                f"orchestrator must have an async invoke(agent_id, context), "
                f"got {type(orchestrator).__name__}"
            )
        if halt_checker is not None and not isinstance(halt_checker, HaltChecker):
            raise InvalidRequestError(
                "halt_checker must have async is_halted() and get_halt_reason(), "
                f"got {type(halt_checker).__name__}"
            )
        check_sync_hooks(halt_checker, "halt_checker")
        if pool is not None and not isinstance(pool, AgentPool):
            raise InvalidRequestError(f"pool must be an AgentPool, got {type(pool).__name__}")
        if witness is not None and not isinstance(witness, OutputWitness):
            raise InvalidRequestError(
                f"witness must have an async commit(output), got {type(witness).__name__}"
            )
        if rate_limit is not None and not isinstance(rate_limit, RateLimit):
            raise InvalidRequestError(
                f"rate_limit must be a RateLimit or None, got {type(rate_limit).__name__}"
            )
        poll = check_seconds(halt_poll_interval, "halt_poll_interval")
        read_timeout = check_seconds(halt_read_timeout, "halt_read_timeout")

        self._orchestrator = orchestrator
        self._halt_checker = halt_checker
        # Asked just before each start and each release (see HaltProbe).
        self._halted_now: Callable[[], bool] | None = (
            halt_checker.halted_now if isinstance(halt_checker, HaltProbe) else None
        )
        # What else the channel can do, decided once (a runtime Protocol check costs
        # microseconds: not something to repeat per batch).
        self._on_halt: Callable[[Callable[[str], None]], Callable[[], None]] | None = (
            halt_checker.on_halt if isinstance(halt_checker, HaltNotifier) else None
        )
        self._halt_waits = isinstance(halt_checker, HaltWaiter)
        self._pool = pool if pool is not None else AgentPool()
        self._agent_timeout = _check_timeout(agent_timeout)
        self._halt_poll_interval = poll
        self._halt_read_timeout = read_timeout
        self._witness = witness
        self._deadline = check_deadline(deadline)
        self._hedge = check_hedge(hedge)
        # Recent successful agent latencies, for hedging on an observed quantile.  Kept
        # from the service's start if it hedges by default, else from the first call that
        # asks for hedging: a service that never hedges does not pay for it per agent.
        self._latencies: LatencyWindow | None = LatencyWindow() if hedge is not None else None
        self._rate_limit = rate_limit
        self.metrics = ServiceMetrics(lambda: self._pool.active_count)

    # ------------------------------------------------------------ read side

    @property
    def pool(self) -> AgentPool:
        return self._pool

    @property
    def halt_checker(self) -> HaltChecker | None:
        return self._halt_checker

    @property
    def available_capacity(self) -> int:
        return self._pool.available_count

    @property
    def active_count(self) -> int:
        return self._pool.active_count

    def get_pool_status(self) -> PoolStatus:
        return self._pool.status()

    # ------------------------------------------------------------ public calls

    async def invoke_concurrent(
        self,
        requests: Iterable[AgentRequest],
        *,
        overflow: Overflow = "reject",
        agent_timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        deadline: float | None = None,
        quorum: int | None = None,
        hedge: HedgePolicy | None = None,
    ) -> ConcurrentResult:
        """Run every request at once; return every outcome, in request order.

        Tail control (each optional; ``deadline`` and ``hedge`` default to the service's):

        * ``deadline`` -- seconds for the whole batch from its start.  At the deadline
          every agent without an outcome is cancelled and becomes a ``TIMEOUT`` ("batch
          deadline"); the call returns normally.
        * ``quorum`` -- 1 <= quorum <= len(requests).  As soon as that many agents have
          succeeded, the rest are cancelled and become ``CANCELLED``; the call returns
          normally.  With a deadline too, whichever comes first.
        * ``hedge`` -- a :class:`HedgePolicy`: an agent still running after its delay gets
          one duplicate call (if a pool slot is free and the budget allows); the first
          success wins and the other call is cancelled.  ``result.hedged_agents`` names
          them.

        ``on_progress(done, total, agent_id, status)`` is called as each agent finishes
        (after its witness commit, if any); it may be a plain callable or an ``async``
        function (awaited).  Its errors are logged and ignored.  Agents cancelled or
        never started because of a halt are not reported there, only in the
        ``partial`` result of the :class:`SystemHaltedError`.

        ``overflow="reject"`` (FR10) admits the whole batch or raises
        :class:`AgentPoolExhaustedError` having invoked nothing; ``"queue"`` lets the
        batch exceed the free capacity, agents starting FIFO as slots free up.
        A halt during the batch raises :class:`SystemHaltedError` whose ``partial``
        holds every outcome, the cancelled and unstarted agents as ``HALTED``.
        """
        if overflow not in ("reject", "queue"):
            raise InvalidRequestError(f"overflow must be 'reject' or 'queue', got {overflow!r}")
        tail = _Tail(
            self._deadline if deadline is None else deadline,
            quorum,
            self._hedge if hedge is None else hedge,
        )
        return await self._deliberate(requests, overflow, agent_timeout, on_progress, tail)

    async def invoke_sequential(
        self,
        requests: Iterable[AgentRequest],
        *,
        agent_timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        deadline: None = None,
        quorum: None = None,
        hedge: None = None,
    ) -> ConcurrentResult:
        """Run the requests one at a time, in order, checking the halt before each turn.

        Tail control is for concurrent batches: ``deadline``, ``quorum`` or ``hedge``
        given here raise :class:`InvalidRequestError` (the service's defaults do not
        apply to sequential runs).
        """
        for name, value in (("deadline", deadline), ("quorum", quorum), ("hedge", hedge)):
            if value is not None:
                raise InvalidRequestError(
                    f"{name} is for concurrent batches; invoke_sequential takes no {name}"
                )
        return await self._deliberate(
            requests, "sequential", agent_timeout, on_progress, _Tail(None, None, None)
        )

    async def invoke_single(
        self, request: AgentRequest, *, agent_timeout: float | None = None
    ) -> AgentOutput:
        """Run one agent; return its output or raise :class:`AgentInvocationError`."""
        if not isinstance(request, AgentRequest):
            raise InvalidRequestError(
                f"request must be an AgentRequest, got {type(request).__name__}"
            )
        tail = _Tail(self._deadline, None, self._hedge)
        result = await self._deliberate([request], "reject", agent_timeout, None, tail)
        if result.outputs:
            return result.outputs[0]
        failure = result.failures[0]
        raise AgentInvocationError(
            f"agent {failure.agent_id!r} failed ({failure.kind.value}): {failure.message}",
            failure=failure,
        )

    # ------------------------------------------------------------ the data path

    async def _deliberate(
        self,
        requests: Iterable[AgentRequest],
        mode: _Mode,
        agent_timeout: float | None,
        on_progress: ProgressCallback | None,
        tail: _Tail,
    ) -> ConcurrentResult:
        # 1. Halt first: a halted system does nothing, not even validate.
        reason = await self._read_halt()
        if reason is not None:
            self.metrics.record_halted()
            log.warning("batch refused: system halted", extra={"mode": mode})
            raise SystemHaltedError(reason)

        # 2. Validate: bad input changes nothing.
        checked = _check_requests(requests)
        timeout = self._agent_timeout if agent_timeout is None else _check_timeout(agent_timeout)
        batch = _Batch(checked, mode, timeout, _check_progress(on_progress))
        deadline = check_deadline(tail.deadline)
        batch.quorum = check_quorum(tail.quorum, len(checked))
        hedge = check_hedge(tail.hedge)
        started_at, t0 = utc_now(), trio.current_time()
        if not checked:
            return self._result(batch, started_at, t0)
        if deadline is not None:
            batch.deadline = t0 + deadline
        if hedge is not None:
            if self._latencies is None:
                self._latencies = LatencyWindow()
            batch.hedge_delay = hedge.delay_for(self._latencies)
            batch.hedges_left = hedge.max_hedged(len(checked))

        # 3. Admit: all or nothing.
        try:
            admission = self._pool.admit([r.agent_id for r in checked], queue=mode != "reject")
            await admission.reserve_shared()  # a cluster-wide capacity, if the pool has one
        except AgentPoolExhaustedError as exc:
            self.metrics.record_refused()
            log.warning(
                "batch refused",
                extra={"reason": str(exc), "batch_size": len(checked), "mode": mode},
            )
            raise

        # 4. Run; 7. whatever happens, every slot and claim comes back.
        batch.admission = admission
        async with admission:
            await self._run(batch)

        # 5. A deadline or a quorum cut the batch short: a normal result, every outcome.
        if batch.done == len(batch.requests):  # every agent has its outcome
            return self._result(batch, started_at, t0)
        if batch.stop != "halt":
            batch.fill_unfinished(trio.current_time())
            return self._result(batch, started_at, t0)

        # 6. A halt cut it short: the caller gets everything so far, in the error.
        if batch.reason is None:  # seen through the probe; ask the channel why
            batch.reason = await self._read_halt() or NO_REASON
        batch.fill_unfinished(trio.current_time())
        result = self._result(batch, started_at, t0, halted=True)
        log.warning(
            "batch halted",
            extra={
                "batch_id": str(batch.batch_id),
                "success_count": result.success_count,
                "failure_count": result.failure_count,
            },
        )
        raise SystemHaltedError(batch.reason, partial=result)

    async def _run(self, batch: _Batch) -> None:
        """Run the batch's agents in one nursery, under a scope a halt can cancel."""
        checker = self._halt_checker
        admission = batch.admission
        assert admission is not None
        # A channel that can call back cancels the batch from inside its halt(), so not
        # even a commit finishing in the same instant is released after it.
        stop_listening: Callable[[], None] | None = None
        if self._on_halt is not None:
            try:
                stop_listening = self._on_halt(functools.partial(batch.stop_now, "halt"))
            except Exception as exc:  # a channel that raises is halted: nothing starts
                batch.stop_now("halt", _checker_failed(exc))
        try:
            # The reports of recorded outcomes run outside the run scope: a stop that
            # comes after an outcome was recorded (the quorum it completes, a halt in the
            # same instant) must not cut its report short.
            async with trio.open_nursery() as batch.reports, trio.open_nursery() as watchers:
                if checker is not None:
                    watchers.start_soon(self._watch_halt, batch)
                if batch.deadline is not None:
                    watchers.start_soon(_watch_deadline, batch, batch.deadline)
                with batch.run_scope:
                    if batch.mode == "sequential":
                        await self._run_in_turn(batch, admission)
                    else:
                        async with trio.open_nursery() as agents:
                            if batch.mode == "reject":
                                for index, slot in enumerate(admission.slots):
                                    agents.start_soon(self._run_agent, batch, index, slot)
                            else:
                                await self._feed_queue(batch, agents, admission)
                watchers.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None
        finally:
            if stop_listening is not None:
                stop_listening()

    async def _feed_queue(self, batch: _Batch, agents: trio.Nursery, admission: Admission) -> None:
        # Take each slot *before* spawning the agent's task: a queue of thousands of
        # agents costs thousands of waiting requests, not thousands of parked tasks.
        for index, req in enumerate(batch.requests):
            try:
                slot = await admission.take_slot(req.agent_id)
            except AgentPoolExhaustedError as exc:
                if index == 0:
                    raise  # nothing started: the batch is refused, as in reject mode
                # The capacity went away mid-batch (a shared one became unreachable): the
                # agents not started yet fail with the reason, the running ones finish.
                self._not_admitted(batch, index, exc)
                return
            agents.start_soon(self._run_agent, batch, index, slot)

    def _not_admitted(self, batch: _Batch, first: int, exc: AgentPoolExhaustedError) -> None:
        now = trio.current_time()
        for index in range(first, len(batch.requests)):
            req = batch.requests[index]
            failure = _failure(
                req, FailureKind.ERROR, type(exc).__name__, f"not started: {exc}", now
            )
            self._record(batch, index, failure, now)

    async def _run_in_turn(self, batch: _Batch, admission: Admission) -> None:
        for index, req in enumerate(batch.requests):
            reason = await self._read_halt()  # before every turn
            if reason is not None:
                batch.stop_now("halt", reason)
                return
            await self._report(batch, req.agent_id, "starting")
            slot = await admission.take_slot(req.agent_id)
            await self._run_agent(batch, index, slot)

    def _stopped(self, batch: _Batch) -> bool:
        """Has this batch stopped, even an instant ago?  (Synchronous, no checkpoint.)

        A halt seen through the channel's probe, or a deadline just passed, stops it here
        even before the task watching for it wakes up.
        """
        if batch.stop is not None:
            return True
        probe = self._halted_now
        if probe is not None:
            try:
                halted = bool(probe())
            except Exception as exc:  # a probe that raises stops the batch, as a read does
                batch.stop_now("halt", _checker_failed(exc))
                return True
            if halted:
                batch.stop_now("halt")
                return True
        if batch.deadline is not None and trio.current_time() >= batch.deadline:
            batch.stop_now("deadline")
            return True
        return False

    async def _run_agent(self, batch: _Batch, index: int, slot: Slot) -> None:
        req = batch.requests[index]
        assert batch.admission is not None
        try:
            if self._stopped(batch):  # nothing starts after a halt, deadline or quorum
                return
            if self._rate_limit is not None:
                await self._rate_limit.acquire()
                if self._stopped(batch):
                    return
            start = trio.current_time()
            batch.started[index] = start
            self.metrics.record_started()
            outcome = await self._attempt(batch, index, start)
        finally:
            batch.admission.release(slot)
        if outcome is None:  # withheld: the batch stopped before its release
            return
        # Recorded with no checkpoint since the stop check in _attempt: what is recorded
        # as a success was released before any halt.
        self._record(batch, index, outcome, start)
        if batch.on_progress is not None:
            status = "completed" if isinstance(outcome, AgentOutput) else "failed"
            answer = self._call_progress(batch, req.agent_id, status)
            if answer is not None:
                assert batch.reports is not None
                # One agent at a time: its report is done before the next turn starts.
                reported = trio.Event() if batch.mode == "sequential" else None
                batch.reports.start_soon(
                    self._await_progress, batch, req.agent_id, answer, reported
                )
                if reported is not None:
                    await reported.wait()

    async def _attempt(self, batch: _Batch, index: int, start: float) -> _Outcome | None:
        """Invoke one agent and turn whatever happens into exactly one outcome.

        Returns None if the call ended after the batch stopped (an output is withheld;
        the stop decides the outcome); a cancellation the kernel asked for propagates.
        """
        req = batch.requests[index]
        # One call, or (hedging) the first success of two.  The single call is awaited
        # here rather than through _invoke: one coroutine less per agent on the hot path.
        call: Coroutine[Any, Any, object] = (
            self._orchestrator.invoke(req.agent_id, req.context)
            if batch.hedge_delay is None
            else self._hedged(batch, index, start)
        )
        timeout_scope = None
        result: object = None
        try:
            if batch.timeout is None:
                # No timeout: no cancel scope either (it is per-agent cost on the hot path).
                result = await call
            else:
                timeout_scope = trio.CancelScope(deadline=start + batch.timeout)
                with timeout_scope:
                    result = await call
        except Exception as raised:
            result = _Raised(raised)
        except trio.Cancelled:
            if _cancel_requested():
                raise
            result = _Raised(None)  # a Cancelled nobody asked for
        if timeout_scope is not None and (
            timeout_scope.cancel_called or trio.current_time() >= timeout_scope.deadline
        ):
            # Cancelled by its timeout (perhaps turned into an error), or it returned too
            # late: either way, a timeout.
            return self._timeout_failure(batch, req, start)

        # Whatever comes back after the batch stopped is cut short by that stop: an
        # output is withheld (never released, not to the caller, not to the witness:
        # the orchestrator returned in the same instant as a halt, or swallowed its
        # cancellation), and an error is the stop's cancellation turned into an
        # exception, as a timeout's is above.
        if self._stopped(batch):
            if isinstance(result, AgentOutput):
                batch.withheld.add(index)
            return None
        if isinstance(result, _Raised):
            if result.exc is None:
                return _stray_cancel(req, start)
            error = result.exc
            return _failure(req, FailureKind.ERROR, type(error).__name__, _describe(error), start)
        # The common case first, without a call: this agent's own output.
        ok = result.__class__ is AgentOutput and result.agent_id == req.agent_id
        problem = None if ok else _invalid(result, req)
        if isinstance(result, AgentOutput) and result.output_id in batch.output_ids:
            problem = problem or (
                f"orchestrator returned output {result.output_id} for agent "
                f"{req.agent_id!r}, an output id another agent of this batch already has"
            )
        if problem is not None or not isinstance(result, AgentOutput):
            return _failure(req, FailureKind.INVALID_OUTPUT, "", problem or "", start)
        batch.output_ids.add(result.output_id)
        output = stamp_output(result, req.request_id, batch.batch_id)

        if self._witness is not None:
            # Cancellable: a halt during the commit withholds the output, and the witness
            # promises never to write it.  A commit past its point of no return returns
            # normally, and the output is released: the log and the result agree.
            try:
                await self._witness.commit(output)
            except Exception as exc:
                return _failure(
                    req,
                    FailureKind.WITNESS,
                    type(exc).__name__,
                    f"witness commit failed: {_describe(exc)}",
                    start,
                )
            except trio.Cancelled:
                if _cancel_requested():
                    batch.withheld.add(index)
                    raise
                return _failure(
                    req, FailureKind.WITNESS, "Cancelled", "witness commit was cancelled", start
                )
        return output

    async def _invoke(self, req: AgentRequest) -> object:
        """One orchestrator call: what it returned, or what it raised as a :class:`_Raised`."""
        try:
            return await self._orchestrator.invoke(req.agent_id, req.context)
        except Exception as exc:
            return _Raised(exc)
        except trio.Cancelled:
            if _cancel_requested():
                raise
            return _Raised(None)  # a Cancelled nobody asked for

    async def _hedged(self, batch: _Batch, index: int, start: float) -> object:
        """Race the agent's call against one duplicate started after the hedge delay.

        The first valid output wins and the other call is cancelled.  A call that fails
        leaves the other running; if both fail, the first call's answer stands.  The
        duplicate starts only if the first is still running at the delay, the batch's
        hedge budget allows, and a pool slot is free (nobody waiting for one).
        """
        req = batch.requests[index]
        admission = batch.admission
        assert admission is not None and batch.hedge_delay is not None
        hedge_at = start + batch.hedge_delay
        answers: dict[str, object] = {}
        winner: list[object] = []
        hedging = False

        async with trio.open_nursery() as race:

            def finished(which: str, answer: object) -> None:
                if winner:
                    return  # decided: an answer in the same round, after it, changes nothing
                answers[which] = answer
                if _invalid(answer, req) is None:
                    winner.append(answer)
                    if which == "hedge":
                        self.metrics.record_hedge_won()
                    race.cancel_scope.cancel()
                elif which == "hedge" or not hedging:
                    race.cancel_scope.cancel()  # nothing left to wait for

            async def first() -> None:
                finished("first", await self._invoke(req))

            async def hedge() -> None:
                nonlocal hedging
                await trio.sleep_until(hedge_at)
                if "first" in answers:
                    return
                slot = await self._start_hedge(batch, admission, req.agent_id)
                if slot is None:
                    return
                batch.hedged.add(index)
                self.metrics.record_hedge_launched()
                hedging = True
                try:
                    answer = await self._invoke(req)
                finally:
                    admission.release(slot)
                    hedging = False
                if "first" in answers or _invalid(answer, req) is None:
                    finished("hedge", answer)

            race.start_soon(first)
            race.start_soon(hedge)
        return winner[0] if winner else answers["first"]

    async def _start_hedge(self, batch: _Batch, admission: Admission, agent_id: str) -> Slot | None:
        """Take what a hedge needs to start: a share of the budget, a slot (and its
        shared lease), the rate limit's turn.  None (everything given back) if it may
        not start: no budget or slot left, or the batch stopped meanwhile."""
        if batch.hedges_left <= 0:
            return None
        # Taken here, before the first checkpoint (the shared lease, the rate limit): the
        # hedges due in the same tick all pass the check above before any of them gets
        # past an await, so a share taken after one would let every one of them through.
        batch.hedges_left -= 1
        slot: Slot | None = None
        try:
            slot = await admission.take_extra_slot(agent_id)
            if slot is not None and self._rate_limit is not None:
                await self._rate_limit.acquire()
        except BaseException:
            batch.hedges_left += 1
            if slot is not None:
                admission.release(slot)
            raise
        if slot is not None and not self._stopped(batch):
            return slot
        batch.hedges_left += 1
        if slot is not None:
            admission.release(slot)
        return None

    def _timeout_failure(self, batch: _Batch, req: AgentRequest, start: float) -> AgentFailure:
        return _failure(
            req,
            FailureKind.TIMEOUT,
            "",
            f"agent exceeded its timeout of {batch.timeout:g} s",
            start,
        )

    def _record(self, batch: _Batch, index: int, outcome: _Outcome, start: float) -> None:
        batch.outcomes[index] = outcome
        batch.done += 1
        if isinstance(outcome, AgentOutput):
            if self._latencies is not None:
                self._latencies.append(trio.current_time() - start)
            batch.succeeded += 1
            if batch.quorum is not None and batch.succeeded >= batch.quorum:
                batch.stop_now("quorum")
        else:
            log.warning(
                "agent failed",
                extra={
                    "batch_id": str(batch.batch_id),
                    "agent_id": outcome.agent_id,
                    "request_id": str(outcome.request_id),
                    "failure_kind": outcome.kind.value,
                    "error_type": outcome.error_type,
                    "error_message": outcome.message[:_MAX_LOGGED_MESSAGE],
                    "elapsed_ms": round(outcome.elapsed_ms, 3),
                },
            )

    async def _report(self, batch: _Batch, agent_id: str, status: str) -> None:
        """Tell ``on_progress``, and wait for it if it is async."""
        answer = self._call_progress(batch, agent_id, status)
        if answer is not None:
            await self._await_progress(batch, agent_id, answer)

    def _call_progress(self, batch: _Batch, agent_id: str, status: str) -> Awaitable[object] | None:
        """Call ``on_progress`` now (with the count as it is now); what it returned if
        that is to be awaited.  A broken display must not take the deliberation down."""
        if batch.on_progress is None:
            return None
        try:
            answer = batch.on_progress(batch.done, len(batch.requests), agent_id, status)
        except Exception:
            _progress_failed(batch, agent_id)
            return None
        return answer if inspect.isawaitable(answer) else None

    async def _await_progress(
        self,
        batch: _Batch,
        agent_id: str,
        answer: Awaitable[object],
        reported: trio.Event | None = None,
    ) -> None:
        try:
            await answer
        except Exception:
            _progress_failed(batch, agent_id)
        except trio.Cancelled:
            if _cancel_requested():
                raise
            log.error(
                "on_progress callback let a stray trio.Cancelled escape; ignored",
                extra={"batch_id": str(batch.batch_id), "agent_id": agent_id},
            )
        finally:
            if reported is not None:
                reported.set()

    def _result(
        self, batch: _Batch, started_at: datetime, t0: float, *, halted: bool = False
    ) -> ConcurrentResult:
        total_ms = (trio.current_time() - t0) * 1000.0
        outputs = tuple(o for o in batch.outcomes if isinstance(o, AgentOutput))
        failures = tuple(o for o in batch.outcomes if isinstance(o, AgentFailure))
        result = ConcurrentResult(
            batch_id=batch.batch_id,
            outputs=outputs,
            failures=failures,
            started_at=started_at,
            completed_at=utc_now(),
            total_ms=max(total_ms, 0.0),
            hedged_agents=tuple(batch.requests[i].agent_id for i in sorted(batch.hedged)),
        )
        self.metrics.record_result(result, halted=halted)
        log.info(
            "batch finished",
            extra={
                "batch_id": str(batch.batch_id),
                "mode": batch.mode,
                "batch_size": len(batch.requests),
                "success_count": len(outputs),
                "failure_count": len(failures),
                "total_ms": round(result.total_ms, 3),
            },
        )
        return result

    # ------------------------------------------------------------ halt

    async def _read_halt(self) -> str | None:
        """The halt reason if the channel says halted, else None.  Fail-safe on errors."""
        checker = self._halt_checker
        if checker is None:
            return None
        try:
            return await read_halt(checker, self._halt_read_timeout)
        except Exception as exc:
            return _checker_failed(exc)
        except trio.Cancelled as exc:
            if _cancel_requested():
                raise
            return _checker_failed(exc)  # a channel that made up a cancellation

    async def _watch_halt(self, batch: _Batch) -> None:
        assert self._halt_checker is not None
        try:
            reason = await wait_for_halt(
                self._halt_checker,
                self._halt_poll_interval,
                self._halt_read_timeout,
                waits=self._halt_waits,
            )
        except Exception as exc:
            reason = _checker_failed(exc)
        except trio.Cancelled as exc:
            if _cancel_requested():
                raise
            reason = _checker_failed(exc)  # a stray: it must not end the batch as if done
        batch.stop_now("halt", reason)


def _progress_failed(batch: _Batch, agent_id: str) -> None:
    log.exception(
        "on_progress callback raised; ignored",
        extra={"batch_id": str(batch.batch_id), "agent_id": agent_id},
    )


def _checker_failed(exc: BaseException) -> str:
    """Fail-safe: a halt checker that cannot be read means the system is halted."""
    log.error(
        "halt checker failed; treating the system as halted",
        extra={"error_type": type(exc).__name__},
    )
    return f"halt checker failed ({type(exc).__name__}); treated as halted"


def _failure(
    req: AgentRequest, kind: FailureKind, error_type: str, message: str, start: float
) -> AgentFailure:
    return AgentFailure(
        agent_id=req.agent_id,
        request_id=req.request_id,
        kind=kind,
        error_type=error_type,
        message=message,
        elapsed_ms=max((trio.current_time() - start) * 1000.0, 0.0),
    )


async def _watch_deadline(batch: _Batch, deadline: float) -> None:
    await trio.sleep_until(deadline)
    batch.stop_now("deadline")


def _invalid(answer: object, req: AgentRequest) -> str | None:
    """Why ``answer`` is not a valid output of ``req``'s agent, or None if it is."""
    if isinstance(answer, _Raised):
        return "the call raised"
    if not isinstance(answer, AgentOutput):
        return f"orchestrator returned {type(answer).__name__}, expected AgentOutput"
    if answer.agent_id != req.agent_id:
        return (
            f"orchestrator returned an output of agent {answer.agent_id!r} "
            f"for agent {req.agent_id!r}"
        )
    return None


def _stray_cancel(req: AgentRequest, start: float) -> AgentFailure:
    return _failure(
        req,
        FailureKind.ERROR,
        "Cancelled",
        "orchestrator raised a trio.Cancelled that no halt, timeout or caller asked for",
        start,
    )


def _unwrap(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """Surface the one exception that matters from a nursery's group.

    Agents never raise ``Exception``s out of their tasks, so what reaches here is a
    ``BaseException`` an agent let through (``KeyboardInterrupt``, ``SystemExit``) or
    cancellation.  The first non-``Cancelled`` leaf is re-raised as itself, the way a
    caller expects to catch it; a group of only ``Cancelled`` goes up unchanged, for the
    cancel scope that owns it.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop(0)
        if isinstance(exc, BaseExceptionGroup):
            stack[:0] = list(exc.exceptions)
        else:
            leaves.append(exc)
    for leaf in leaves:
        if not isinstance(leaf, trio.Cancelled):
            return leaf
    return group
