"""The deliberation service: the facade over one batch run.

The data path of a call reads straight down:

    request -> halt check -> validate -> admit -> run the batch (_batch.py: scheduling,
            stop; _attempt.py: one agent -> one outcome; _tail.py: deadline, quorum,
            hedge) -> result, or SystemHaltedError holding it

Every request ends in exactly one outcome, every slot comes back, and a halt cancels
everything in flight at once.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Iterable
from typing import Literal, NamedTuple
from uuid import UUID

import trio

from kernel._attempt import AgentCall
from kernel._batch import Batch, Mode
from kernel._cancel import surface
from kernel._errors import AgentPoolExhaustedError, InvalidRequestError
from kernel._halt import DEFAULT_HALT_READ_TIMEOUT, NO_REASON
from kernel._halt_watch import HaltWatch
from kernel._metrics import ServiceMetrics
from kernel._outcome_errors import AgentInvocationError, SystemHaltedError
from kernel._pool import Admission, AgentPool
from kernel._ports import (
    AgentOrchestratorProtocol,
    BatchLog,
    HaltChecker,
    OutputWitness,
    RecordedBatch,
)
from kernel._progress import ProgressCallback
from kernel._rate import RateLimit
from kernel._resume import parse_batch_id, request_set, resumed_outputs
from kernel._tail import HedgePolicy, LatencyWindow, check_deadline, check_hedge, check_quorum
from kernel._types import AgentOutput, AgentRequest, ConcurrentResult, PoolStatus, utc_now
from kernel.events import BatchRefused
from kernel.validate import check_seconds

__all__ = ["ConcurrentDeliberationService", "Overflow", "ProgressCallback"]

log = logging.getLogger("kernel.service")

Overflow = Literal["reject", "queue"]


class _Tail(NamedTuple):
    """A call's tail control, before validation."""

    deadline: object
    quorum: object
    hedge: object


_NO_TAIL = _Tail(None, None, None)


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
        halt = HaltWatch(halt_checker, halt_poll_interval, halt_read_timeout)
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
        self._halt = halt
        self._pool = pool if pool is not None else AgentPool()
        self._agent_timeout = _check_timeout(agent_timeout)
        self._deadline = check_deadline(deadline)
        self._hedge = check_hedge(hedge)
        # Recent successful agent latencies, for hedging on an observed quantile.  Kept
        # from the service's start if it hedges by default, else from the first call that
        # asks for hedging: a service that never hedges does not pay for it per agent.
        self._latencies: LatencyWindow | None = LatencyWindow() if hedge is not None else None
        self._rate_limit = rate_limit
        # A witness that records batches makes every batch resumable.
        self._batch_log: BatchLog | None = witness if isinstance(witness, BatchLog) else None
        self.metrics = ServiceMetrics(lambda: self._pool.active_count)
        self._call = AgentCall(orchestrator, witness, self.metrics)

    # ------------------------------------------------------------ read side

    @property
    def pool(self) -> AgentPool:
        return self._pool

    @property
    def halt_checker(self) -> HaltChecker | None:
        return self._halt.checker

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
        resume: str | UUID | None = None,
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

        ``resume`` -- the ``batch_id`` of an earlier run of the same requests (same agent
        ids, same context: see :func:`~kernel.context_fingerprint`), whose witness (a
        :class:`BatchLog`, like the SQLite witness) holds its outputs.  The agents with a
        committed output are not invoked again: their outputs come back as committed
        (``request_id`` included), with ``metadata["resumed"] = True``, and count towards
        the quorum; the rest run under this call's rules, in the same batch (the result
        has the same ``batch_id``).  A batch not in the log, or a different request set,
        raises :class:`InvalidRequestError` having invoked nothing.
        """
        if overflow not in ("reject", "queue"):
            raise InvalidRequestError(f"overflow must be 'reject' or 'queue', got {overflow!r}")
        tail = _Tail(
            self._deadline if deadline is None else deadline,
            quorum,
            self._hedge if hedge is None else hedge,
        )
        return await self._deliberate(
            requests, overflow, agent_timeout, on_progress, tail, resume=resume
        )

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
        return await self._deliberate(requests, "sequential", agent_timeout, on_progress, _NO_TAIL)

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
        mode: Mode,
        agent_timeout: float | None,
        on_progress: ProgressCallback | None,
        tail: _Tail,
        *,
        resume: object = None,
    ) -> ConcurrentResult:
        # 1. Halt first: a halted system does nothing, not even validate.
        reason = await self._halt.read()
        if reason is not None:
            self.metrics.record_halted()
            if self.metrics.observers:
                self.metrics.observers.emit(BatchRefused("halted", reason))
            log.warning("batch refused: system halted", extra={"mode": mode})
            raise SystemHaltedError(reason)
        # 2. Validate: bad input changes nothing.  A resume reads the log (nothing
        #    invoked yet) and refuses a request set that is not the batch's.
        resumed_id = None if resume is None else self._check_resume(resume)
        batch = self._batch(requests, mode, agent_timeout, on_progress, tail, resumed_id)
        if resumed_id is not None:
            await self._resume(batch)
            hedge = check_hedge(tail.hedge)  # checked above: only its budget is read here
            if hedge is not None:  # a share of the agents this run invokes, not the batch's
                batch.hedges_left = hedge.max_hedged(len(batch.pending))
        started_at, t0 = utc_now(), trio.current_time()
        if not batch.pending:  # empty, or every agent resumed
            return batch.result(started_at, t0)
        if self._batch_log is not None:
            batch.begin_run = functools.partial(
                self._batch_log.begin_run, batch.batch_id, request_set(batch.requests)
            )
        if batch.deadline is not None:
            batch.deadline += t0
        # 3. Admit: all or nothing.  4. Run; whatever happens, every slot comes back.
        async with await self._admit(batch) as admission:
            await batch.run(admission)
        # 5. Done, or cut short by a deadline or a quorum: a normal result, every outcome.
        if not batch.halted:
            return batch.result(started_at, t0)
        # 6. A halt cut it short: the caller gets everything so far, in the error.
        if batch.reason is None:  # seen through the probe; ask the channel why
            batch.reason = await self._halt.read() or NO_REASON
        result = batch.result(started_at, t0)
        log.warning(
            "batch halted",
            extra={
                "batch_id": str(batch.batch_id),
                "success_count": result.success_count,
                "failure_count": result.failure_count,
            },
        )
        raise SystemHaltedError(batch.reason, partial=result)

    def _batch(
        self,
        requests: Iterable[AgentRequest],
        mode: Mode,
        agent_timeout: float | None,
        on_progress: ProgressCallback | None,
        tail: _Tail,
        batch_id: UUID | None = None,
    ) -> Batch:
        """The batch a call asks for, every argument checked (the deadline relative)."""
        checked = _check_requests(requests)
        timeout = self._agent_timeout if agent_timeout is None else _check_timeout(agent_timeout)
        progress = _check_progress(on_progress)
        deadline = check_deadline(tail.deadline)
        quorum = check_quorum(tail.quorum, len(checked))
        hedge = check_hedge(tail.hedge)
        if hedge is not None and self._latencies is None:
            self._latencies = LatencyWindow()
        batch = Batch(
            checked,
            mode,
            timeout,
            progress,
            call=self._call,
            halt=self._halt,
            metrics=self.metrics,
            rate_limit=self._rate_limit,
            latencies=self._latencies,
            batch_id=batch_id,
        )
        batch.deadline, batch.quorum = deadline, quorum
        if hedge is not None and checked:
            assert self._latencies is not None
            batch.hedge_delay = hedge.delay_for(self._latencies)
            batch.hedges_left = hedge.max_hedged(len(checked))
        return batch

    def _check_resume(self, resume: object) -> UUID:
        batch_id = parse_batch_id(resume)
        if self._batch_log is None:
            raise InvalidRequestError(
                "resume needs a witness that records batches (a BatchLog, like the SQLite "
                "witness); this service has "
                + ("no witness" if self._call.witness is None else "one that does not")
            )
        return batch_id

    async def _resume(self, batch: Batch) -> None:
        """Take the batch's committed outputs from its log (or refuse the resume)."""
        recorded = await self._read_unless_halted(batch.batch_id)
        batch.resume(resumed_outputs(recorded, batch.batch_id, batch.requests))
        log.info(
            "batch resumed",
            extra={
                "batch_id": str(batch.batch_id),
                "resumed_count": batch.done,
                "to_run": len(batch.pending),
                "runs_before": recorded.runs if recorded is not None else 0,
            },
        )

    async def _read_unless_halted(self, batch_id: UUID) -> RecordedBatch | None:
        """The log's record of the batch; a halt meanwhile abandons the read (a stuck log
        must not stand between a halt and the caller) and raises, nothing invoked.  A
        read that ended goes on: the run sees the halt, its partial holding the resumed."""
        assert self._batch_log is not None
        read = self._batch_log.recorded_batch
        halted: list[str] = []
        recorded: RecordedBatch | None = None
        finished = False
        try:
            async with trio.open_nursery() as nursery:

                def on_halt(reason: str) -> None:
                    halted.append(reason)
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    on_halt(await self._halt.wait())

                stop_listening = self._halt.listen(on_halt)
                try:
                    if self._halt.checker is not None:
                        nursery.start_soon(watch)
                    recorded = await read(batch_id)
                    finished = True
                    nursery.cancel_scope.cancel()  # the watcher
                finally:
                    if stop_listening is not None:
                        stop_listening()
        except BaseExceptionGroup as group:
            raise surface(group) from None
        if not finished:
            self.metrics.record_halted()
            log.warning("batch refused: system halted", extra={"batch_id": str(batch_id)})
            raise SystemHaltedError(halted[0] if halted else NO_REASON)
        return recorded

    async def _admit(self, batch: Batch) -> Admission:
        ids = [batch.requests[i].agent_id for i in batch.pending]
        try:
            admission = self._pool.admit(ids, queue=batch.mode != "reject")
            await admission.reserve_shared()  # a cluster-wide capacity, if the pool has one
        except AgentPoolExhaustedError as exc:
            self.metrics.record_refused()
            if self.metrics.observers:
                self.metrics.observers.emit(BatchRefused("capacity", str(exc)))
            log.warning(
                "batch refused",
                extra={"reason": str(exc), "batch_size": len(ids), "mode": batch.mode},
            )
            raise
        return admission


# ---------------------------------------------------------------- argument checks


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
