"""Kernel events: what observers see of a batch, and that they cannot hurt it."""

from __future__ import annotations

import contextvars
import logging
from collections import Counter
from uuid import uuid4

import pytest
import trio
import trio.testing

import kernel.events
from kernel import (
    AgentInvocationError,
    AgentOutput,
    AgentPoolExhaustedError,
    CommitReceipt,
    ConcurrentDeliberationService,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    KernelEvent,
    RateLimit,
    SystemHaltedError,
)
from kernel.events import (
    AgentEnded,
    AgentStarted,
    BatchEnded,
    BatchRefused,
    BatchStarted,
    BatchStopping,
    HedgeEnded,
    RateLimitWaited,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import SlowWitness, halt_after
from tests.support.observers import Recorder, assert_events_agree_with


def _observed(
    orchestrator: object, **kwargs: object
) -> tuple[ConcurrentDeliberationService, Recorder]:
    service = ConcurrentDeliberationService(orchestrator, **kwargs)  # type: ignore[arg-type]
    recorder = Recorder()
    service.metrics.add_observer(recorder)
    return service, recorder


async def test_every_started_agent_ends_once_with_its_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = {"archon-2": Step(0.5, "error"), "archon-3": Step(5.0), "archon-4": Step(0.2, "invalid")}
    service, rec = _observed(ScriptedOrchestrator(plan, Step(1.0)), agent_timeout=2.0)
    result = await service.invoke_concurrent(make_requests(6))
    assert_events_agree_with(rec.events, result)
    assert isinstance(rec.events[0], BatchStarted) and rec.events[0].size == 6
    assert isinstance(rec.events[-1], BatchEnded) and rec.events[-1].result is result
    started = Counter(e.agent_id for e in rec.of(AgentStarted))
    ended = {e.agent_id: e for e in rec.of(AgentEnded)}
    assert started == Counter(f"archon-{i}" for i in range(1, 7))
    assert len(rec.of(AgentEnded)) == 6
    outcomes = {a: e.outcome for a, e in ended.items()}
    assert outcomes == {
        "archon-1": "ok",
        "archon-2": "error",
        "archon-3": "timeout",
        "archon-4": "invalid_output",
        "archon-5": "ok",
        "archon-6": "ok",
    }
    assert ended["archon-1"].duration_s == pytest.approx(1.0)
    assert ended["archon-3"].duration_s == pytest.approx(2.0)
    assert ended["archon-2"].error_type == "RuntimeError"
    assert rec.events[-1].halted is False and rec.events[-1].halt_stop_s is None


async def test_a_halt_is_seen_and_its_time_to_stop_measured(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    plan = {"archon-1": Step(0.1)}
    service, rec = _observed(ScriptedOrchestrator(plan, Step(10.0)), halt_checker=switch)
    await expect_halt(
        lambda: service.invoke_concurrent(make_requests(4)), lambda: halt_after(switch, 1.0)
    )
    stops = rec.of(BatchStopping)
    assert [(s.cause, s.reason) for s in stops] == [("halt", "stop now")]
    end = rec.events[-1]
    assert isinstance(end, BatchEnded) and end.halted and end.stop == "halt"
    assert end.halt_stop_s is not None and 0.0 <= end.halt_stop_s < 0.01
    assert sorted(e.outcome for e in rec.of(AgentEnded)) == ["halted", "halted", "halted", "ok"]
    # Halted now: the next call is refused, and the observers hear why.
    with pytest.raises(SystemHaltedError):
        await service.invoke_concurrent(make_requests(2))
    assert rec.events[-1] == BatchRefused("halted", "stop now")


async def test_a_refused_batch_is_told_with_its_reason() -> None:
    service, rec = _observed(ScriptedOrchestrator())
    with pytest.raises(AgentPoolExhaustedError):
        await service.invoke_concurrent(make_requests(73))
    [event] = rec.events
    assert isinstance(event, BatchRefused) and event.why == "capacity" and "FR10" in event.reason


class ReportsOnFailure:
    """Fails as an adapter does: an AgentInvocationError saying what its call was."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.lowlevel.checkpoint()
        if agent_id == "archon-1":
            raise AgentInvocationError(
                "gave up", metadata={"model": "m-1", "http_statuses": "429 429 503"}
            )
        if agent_id == "archon-2":
            raise OSError("no metadata here")
        return AgentOutput(
            agent_id=agent_id, request_id=uuid4(), content="yes", metadata={"model": "m-2"}
        )


async def test_what_a_call_reports_reaches_its_end_event() -> None:
    service, rec = _observed(ReportsOnFailure())
    await service.invoke_concurrent(make_requests(3))
    ended = {e.agent_id: e for e in rec.of(AgentEnded)}
    assert dict(ended["archon-1"].metadata) == {"model": "m-1", "http_statuses": "429 429 503"}
    assert dict(ended["archon-2"].metadata) == {}
    assert dict(ended["archon-3"].metadata) == {"model": "m-2"}


def test_an_invocation_error_refuses_metadata_that_is_not_scalars() -> None:
    error = AgentInvocationError("x", metadata={"model": "m"})
    with pytest.raises(InvalidRequestError):
        error.metadata = {"model": ["not", "a", "scalar"]}  # type: ignore[dict-item]
    assert dict(error.metadata) == {"model": "m"}


class SlowFirstCall:
    """archon-1's first call takes 10 s; any other call 0.1 s."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.calls[agent_id] += 1
        slow = agent_id == "archon-1" and self.calls[agent_id] == 1
        await trio.sleep(10.0 if slow else 0.1)
        md = {"call": self.calls[agent_id]}
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="ok", metadata=md)


async def test_a_hedge_that_wins_is_told_and_its_agent_reports_nothing_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service, rec = _observed(SlowFirstCall())
    result = await service.invoke_concurrent(
        make_requests(2), hedge=HedgePolicy(delay=1.0, budget=0.5)
    )
    assert result.hedged_agents == ("archon-1",)
    [hedge_end] = rec.of(HedgeEnded)
    assert hedge_end.outcome == "ok" and dict(hedge_end.metadata) == {"call": 2}
    assert hedge_end.duration_s == pytest.approx(0.1)
    ended = {e.agent_id: e for e in rec.of(AgentEnded)}
    assert ended["archon-1"].hedge_won and dict(ended["archon-1"].metadata) == {}
    assert ended["archon-1"].duration_s == pytest.approx(1.1)
    assert not ended["archon-2"].hedge_won


async def test_time_waited_on_the_rate_limit_is_told(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit(per_second=10, burst=1)
    service, rec = _observed(ScriptedOrchestrator(default=Step(0.0)), rate_limit=limit)
    await service.invoke_concurrent(make_requests(3))
    waits = sorted(e.seconds for e in rec.of(RateLimitWaited))
    assert waits == pytest.approx([0.0, 0.1, 0.2])


async def test_an_observer_that_raises_or_is_slow_changes_nothing(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Raises:
        def observe(self, event: KernelEvent) -> None:
            raise RuntimeError("observer bug")

    monkeypatch.setattr(kernel.events, "SLOW_OBSERVER_S", -1.0)  # every call is "slow"
    service = ConcurrentDeliberationService(ScriptedOrchestrator())
    service.metrics.add_observer(Raises())
    rec = Recorder()
    service.metrics.add_observer(rec)
    with caplog.at_level(logging.WARNING, logger="kernel.observe"):
        result = await service.invoke_concurrent(make_requests(5))
    assert result.success_count == 5
    assert len(rec.of(AgentEnded)) == 5  # the next observer still hears everything
    messages = {r.getMessage() for r in caplog.records}
    assert "kernel observer raised; ignored" in messages
    assert "kernel observer is slow; it delays the batch it observes" in messages


def test_an_observer_without_observe_is_refused() -> None:
    service = ConcurrentDeliberationService(ScriptedOrchestrator())
    with pytest.raises(InvalidRequestError, match="observe"):
        service.metrics.add_observer(object())  # type: ignore[arg-type]


async def test_no_event_is_built_without_observers_and_removing_one_stops_it() -> None:
    service, rec = _observed(ScriptedOrchestrator())
    service.metrics.remove_observer(rec)
    await service.invoke_concurrent(make_requests(3))
    assert rec.events == []


CURRENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("current", default=None)


class SetsContext:
    """Sets a context variable on each agent start, as a tracer sets its current span."""

    def observe(self, event: KernelEvent) -> None:
        if isinstance(event, AgentStarted):
            CURRENT.set(event.agent_id)


class SeesContext:
    def __init__(self) -> None:
        self.seen: dict[str, str | None] = {}

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.lowlevel.checkpoint()
        self.seen[agent_id] = CURRENT.get()
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="ok")


@pytest.mark.parametrize("mode", ["concurrent", "sequential"])
async def test_what_an_agent_start_sets_in_context_is_its_call_alone(mode: str) -> None:
    orchestrator = SeesContext()
    service = ConcurrentDeliberationService(orchestrator)
    service.metrics.add_observer(SetsContext())
    requests = make_requests(3)
    if mode == "sequential":
        await service.invoke_sequential(requests)
    else:
        await service.invoke_concurrent(requests)
    assert orchestrator.seen == {r.agent_id: r.agent_id for r in requests}
    assert CURRENT.get() is None  # nothing leaked into the caller's context


@pytest.mark.parametrize(
    ("tail", "cause", "cut"),
    [({"deadline": 1.0}, "deadline", "timeout"), ({"quorum": 2}, "quorum", "cancelled")],
)
async def test_a_deadline_or_a_quorum_is_told_once_and_the_agents_it_cut_end_with_it(
    autojump_clock: trio.testing.MockClock, tail: dict[str, float], cause: str, cut: str
) -> None:
    plan = {"archon-1": Step(0.1), "archon-2": Step(0.2)}
    service, rec = _observed(ScriptedOrchestrator(plan, Step(10.0)))
    result = await service.invoke_concurrent(make_requests(4), **tail)  # type: ignore[arg-type]
    assert_events_agree_with(rec.events, result)
    assert [(s.cause, s.reason) for s in rec.of(BatchStopping)] == [(cause, None)]
    ended = {e.agent_id: e.outcome for e in rec.of(AgentEnded)}
    assert ended == {"archon-1": "ok", "archon-2": "ok", "archon-3": cut, "archon-4": cut}
    end = rec.events[-1]
    assert isinstance(end, BatchEnded) and end.stop == cause and end.halt_stop_s is None


class _Answers:
    """Answers at once, reporting its call (tokens paid whatever happens to the answer)."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.lowlevel.checkpoint()
        metadata = {"model": "m", "prompt_tokens": 11, "completion_tokens": 5}
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="aye", metadata=metadata)


class _BrokenWitness:
    async def commit(self, output: AgentOutput) -> CommitReceipt:
        await trio.lowlevel.checkpoint()
        raise OSError("disk full")


async def test_an_answer_the_witness_could_not_commit_still_reports_its_call() -> None:
    # The call was made and paid for; only its commit failed.  Its end event carried no
    # metadata, so its HTTP request and tokens were in no metric.
    service, rec = _observed(_Answers(), witness=_BrokenWitness())
    result = await service.invoke_concurrent(make_requests(2))
    assert {f.kind for f in result.failures} == {FailureKind.WITNESS}
    for event in rec.of(AgentEnded):
        assert event.outcome == "witness"
        assert dict(event.metadata) == {"model": "m", "prompt_tokens": 11, "completion_tokens": 5}


async def test_an_answer_a_halt_withheld_during_its_commit_still_reports_its_call(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    service, rec = _observed(_Answers(), halt_checker=switch, witness=SlowWitness(10.0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(halt_after, switch, 1.0)
        with pytest.raises(SystemHaltedError):
            await service.invoke_concurrent(make_requests(2))
    ended = rec.of(AgentEnded)
    assert len(ended) == 2
    for event in ended:
        assert event.outcome == "halted"
        assert dict(event.metadata) == {"model": "m", "prompt_tokens": 11, "completion_tokens": 5}
