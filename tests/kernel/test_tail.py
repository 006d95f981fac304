"""Tail control on the virtual clock: batch deadline, quorum and hedged calls."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from uuid import uuid4

import pytest
import trio
import trio.testing

from kernel import (
    AgentOutput,
    AgentPool,
    CommitReceipt,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    RateLimit,
    SystemHaltedError,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.model_capacity import ModelCapacity


@dataclass(frozen=True)
class Call:
    """One call of an agent: wait ``latency`` seconds, then answer (or fail)."""

    latency: float
    fails: bool = False


class PerCall:
    """Each agent's n-th call follows its n-th ``Call`` (the last one repeats)."""

    def __init__(self, plan: Mapping[str, Sequence[Call]], default: Call = Call(1.0)) -> None:
        self.plan = plan
        self.default = default
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled: list[tuple[str, int]] = []
        self.answered: list[tuple[str, int]] = []

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        n = self.calls.get(agent_id, 0)
        self.calls[agent_id] = n + 1
        script = self.plan.get(agent_id, [self.default])
        call = script[min(n, len(script) - 1)]
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(call.latency)
        except trio.Cancelled:
            self.cancelled.append((agent_id, n + 1))
            raise
        finally:
            self.in_flight -= 1
        if call.fails:
            raise RuntimeError(f"call {n + 1} of {agent_id} failed")
        self.answered.append((agent_id, n + 1))
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"call {n + 1}")


# ---------------------------------------------------------------- deadline


async def test_deadline_ends_the_batch_exactly_and_returns_every_outcome(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = {f"archon-{i}": Step(latency=float(i)) for i in range(1, 11)}
    orch = ScriptedOrchestrator(plan)
    service = ConcurrentDeliberationService(orch, HaltSwitch())
    t0 = trio.current_time()
    result = await service.invoke_concurrent(make_requests(10), deadline=5.5)
    assert trio.current_time() - t0 == pytest.approx(5.5)
    assert [o.agent_id for o in result.outputs] == [f"archon-{i}" for i in range(1, 6)]
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}
    assert all("batch deadline" in f.message for f in result.failures)
    assert sorted(orch.cancelled) == sorted(f"archon-{i}" for i in range(6, 11))
    assert service.active_count == 0


async def test_deadline_counts_queued_time_and_names_unstarted_agents(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, pool=AgentPool(2))
    result = await service.invoke_concurrent(make_requests(6), overflow="queue", deadline=1.5)
    assert result.success_count == 2
    messages = sorted(f.message for f in result.failures)
    assert messages.count("not started: batch deadline reached") == 2
    assert messages.count("batch deadline reached") == 2
    assert len(orch.starts) == 4  # nothing started after the deadline


async def test_service_default_deadline_and_a_call_override(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=3.0))
    service = ConcurrentDeliberationService(orch, deadline=1.0)
    result = await service.invoke_concurrent(make_requests(3))
    assert result.success_count == 0
    result = await service.invoke_concurrent(make_requests(3), deadline=10.0)
    assert result.success_count == 3


# ---------------------------------------------------------------- quorum


async def test_quorum_returns_at_the_kth_success_with_failures_mixed_in(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = {f"archon-{i}": Step(latency=float(i)) for i in range(1, 11)}
    plan["archon-2"] = Step(latency=2.0, action="error")
    plan["archon-3"] = Step(latency=3.0, action="invalid")
    orch = ScriptedOrchestrator(plan)
    service = ConcurrentDeliberationService(orch)
    t0 = trio.current_time()
    result = await service.invoke_concurrent(make_requests(10), quorum=4)
    # Successes at 1, 4, 5, 6 s: the 4th success is at 6 s.
    assert trio.current_time() - t0 == pytest.approx(6.0)
    assert result.success_count == 4 and result.total_count == 10
    kinds = {f.agent_id: f.kind for f in result.failures}
    assert kinds["archon-2"] is FailureKind.ERROR
    assert kinds["archon-3"] is FailureKind.INVALID_OUTPUT
    cancelled = [f for f in result.failures if f.kind is FailureKind.CANCELLED]
    assert [f.agent_id for f in cancelled] == [f"archon-{i}" for i in range(7, 11)]
    assert all(f.message == "not needed: quorum of 4 reached" for f in cancelled)


async def test_quorum_that_cannot_be_reached_returns_when_all_are_done(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = {"archon-1": Step(latency=1.0, action="error")}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan, default=Step(2.0)))
    result = await service.invoke_concurrent(make_requests(3), quorum=3)
    assert result.success_count == 2
    assert [f.kind for f in result.failures] == [FailureKind.ERROR]


async def test_quorum_or_deadline_whichever_comes_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = {f"archon-{i}": Step(latency=float(i)) for i in range(1, 6)}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan))
    result = await service.invoke_concurrent(make_requests(5), quorum=4, deadline=2.5)
    assert result.success_count == 2
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}
    result = await service.invoke_concurrent(make_requests(5), quorum=2, deadline=9.0)
    assert result.success_count == 2
    assert {f.kind for f in result.failures} == {FailureKind.CANCELLED}


class Reports:
    """An ``on_progress`` that records each report when its body starts (``begun``) and
    once it has run to the end (``seen``)."""

    def __init__(self, asynchronous: bool = True, pause: float = 0.0) -> None:
        self.asynchronous = asynchronous
        self.pause = pause
        self.begun: list[tuple[str, str]] = []
        self.seen: list[tuple[str, str]] = []
        self.on_report: Callable[[str], object] | None = None

    def __call__(self, done: int, total: int, agent_id: str, status: str) -> object:
        if not self.asynchronous:
            self.begun.append((agent_id, status))
            self.seen.append((agent_id, status))
            return None
        return self._report(agent_id, status)

    async def _report(self, agent_id: str, status: str) -> None:
        self.begun.append((agent_id, status))
        if self.on_report is not None:
            self.on_report(agent_id)
        await trio.sleep(self.pause)  # a checkpoint, as any real async display has
        self.seen.append((agent_id, status))

    def completed(self) -> set[str]:
        return {agent for agent, status in self.seen if status == "completed"}

    def begun_completed(self) -> set[str]:
        return {agent for agent, status in self.begun if status == "completed"}


@pytest.mark.parametrize("asynchronous", [True, False])
async def test_with_a_quorum_every_released_output_is_reported(
    autojump_clock: trio.testing.MockClock, asynchronous: bool
) -> None:
    # archon-1's report is still running (0.5 s) when archon-2 reaches the quorum at 1.2 s,
    # and archon-2's own report starts after it.
    plan = {f"archon-{i}": Step(latency=t) for i, t in enumerate([1.0, 1.2, 3.0, 4.0], 1)}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan))
    reports = Reports(asynchronous, pause=0.5)
    result = await service.invoke_concurrent(make_requests(4), quorum=2, on_progress=reports)
    assert {o.agent_id for o in result.outputs} == {"archon-1", "archon-2"}
    assert sorted(reports.seen) == [("archon-1", "completed"), ("archon-2", "completed")]


async def test_a_hedge_that_wins_at_the_quorum_is_reported(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # archon-2 answers at 0.5 s; archon-1's hedge (from 1 s) answers at 2 s: the quorum.
    orch = PerCall({"archon-1": [Call(10.0), Call(1.0)], "archon-2": [Call(0.5)]})
    service = ConcurrentDeliberationService(orch)
    reports = Reports()
    result = await service.invoke_concurrent(
        make_requests(2), quorum=2, hedge=HedgePolicy(delay=1.0), on_progress=reports
    )
    assert result.hedged_agents == ("archon-1",) and result.outputs[0].content == "call 2"
    assert reports.seen == [("archon-2", "completed"), ("archon-1", "completed")]


@pytest.mark.parametrize("halt", ["in_the_same_tick", "from_the_report"])
async def test_an_output_released_at_the_quorum_is_reported_despite_a_halt(
    autojump_clock: trio.testing.MockClock, halt: str
) -> None:
    switch = HaltSwitch()
    plan = {"archon-1": Step(latency=1.0), "archon-2": Step(latency=1.0)}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan, default=Step(5.0)), switch)
    reports = Reports()
    if halt == "from_the_report":
        reports.on_report = lambda agent_id: switch.halt("stop")

    async def trigger() -> None:
        if halt == "in_the_same_tick":
            await trio.sleep(1.0)
            switch.halt("stop")

    outcome: list[ConcurrentResult] = []

    async def batch() -> None:
        try:
            outcome.append(
                await service.invoke_concurrent(make_requests(3), quorum=2, on_progress=reports)
            )
        except SystemHaltedError as exc:  # the halt came before the quorum
            assert exc.partial is not None
            outcome.append(exc.partial)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger)
        nursery.start_soon(batch)
    (result,) = outcome
    released = {o.agent_id for o in result.outputs}
    # Every released output's report was made; a halt may cut an async one short (it
    # cancels everything in flight), never keep it from being made.
    assert reports.begun_completed() == released
    if halt == "from_the_report":
        assert released  # the report that halted was of a released output
    assert service.pool.available_count == 72


async def test_a_slow_async_report_does_not_delay_a_halt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    plan = {"archon-1": Step(latency=1.0)}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan, default=Step(5.0)), switch)
    reports = Reports(pause=3600.0)  # a display that hangs for an hour

    async def trigger() -> None:
        await trio.sleep(2.0)
        switch.halt("stop")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger)
        with pytest.raises(SystemHaltedError) as caught:
            await service.invoke_concurrent(make_requests(3), on_progress=reports)
        assert trio.current_time() == pytest.approx(2.0)  # at the halt, not an hour later
    assert caught.value.partial is not None
    assert [o.agent_id for o in caught.value.partial.outputs] == ["archon-1"]
    assert reports.begun_completed() == {"archon-1"} and reports.seen == []
    assert service.pool.available_count == 72


@pytest.mark.parametrize("bad", [0, -1, 4, True, 2.0, "2"])
async def test_bad_quorum_is_refused_before_anything_runs(bad: object) -> None:
    orch = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orch)
    with pytest.raises(InvalidRequestError, match="quorum"):
        await service.invoke_concurrent(make_requests(3), quorum=bad)  # type: ignore[arg-type]
    assert orch.starts == [] and service.active_count == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"deadline": 0}, "deadline"),
        ({"deadline": math.nan}, "deadline"),
        ({"hedge": 1.0}, "hedge"),
    ],
)
async def test_bad_tail_settings_are_refused(kwargs: dict[str, object], name: str) -> None:
    orch = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orch)
    with pytest.raises(InvalidRequestError, match=name):
        await service.invoke_concurrent(make_requests(2), **kwargs)  # type: ignore[arg-type]
    assert orch.starts == []


async def test_sequential_refuses_tail_control_but_ignores_service_defaults(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, deadline=0.5, hedge=HedgePolicy(delay=0.1))
    for kwargs in ({"deadline": 1.0}, {"quorum": 1}, {"hedge": HedgePolicy()}):
        with pytest.raises(InvalidRequestError, match="invoke_sequential"):
            await service.invoke_sequential(make_requests(2), **kwargs)
    result = await service.invoke_sequential(make_requests(2))
    assert result.success_count == 2 and result.hedged_agents == ()


def test_hedge_policy_is_validated() -> None:
    for kwargs in (
        {"delay": 0},
        {"delay": -1.0},
        {"quantile": 0},
        {"quantile": 1.5},
        {"budget": -0.1},
        {"budget": 2},
        {"min_samples": 0},
        {"min_samples": 2.5},
    ):
        with pytest.raises(InvalidRequestError):
            HedgePolicy(**kwargs)
    assert HedgePolicy(budget=0.1).max_hedged(30) == 3
    assert HedgePolicy(budget=0.1).max_hedged(72) == 8
    assert HedgePolicy(budget=0.0).max_hedged(72) == 0


# ---------------------------------------------------------------- hedging


async def test_a_slow_agent_is_hedged_after_the_delay_and_the_first_success_wins(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = PerCall({"archon-1": [Call(10.0), Call(1.0)]}, default=Call(0.5))
    service = ConcurrentDeliberationService(orch)
    t0 = trio.current_time()
    result = await service.invoke_concurrent(make_requests(3), hedge=HedgePolicy(delay=2.0))
    assert trio.current_time() - t0 == pytest.approx(3.0)  # hedge at 2 s, answers at 3 s
    assert result.success_count == 3 and result.hedged_agents == ("archon-1",)
    assert result.outputs[0].content == "call 2"
    assert orch.cancelled == [("archon-1", 1)]  # the loser, cancelled
    snap = service.metrics.snapshot()
    assert (snap.hedges_launched, snap.hedges_won) == (1, 1)
    assert service.pool.available_count == 72


async def test_no_hedge_before_the_delay_and_the_first_call_can_still_win(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = PerCall({"archon-1": [Call(2.5), Call(5.0)]}, default=Call(1.9))
    service = ConcurrentDeliberationService(orch)
    result = await service.invoke_concurrent(make_requests(2), hedge=HedgePolicy(delay=2.0))
    assert orch.calls == {"archon-1": 2, "archon-2": 1}  # archon-2 finished before 2 s
    assert result.outputs[0].content == "call 1" and orch.cancelled == [("archon-1", 2)]
    assert service.metrics.snapshot().hedges_won == 0


async def test_a_failed_first_call_does_not_trigger_a_hedge(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = PerCall({"archon-1": [Call(0.5, fails=True)]})
    service = ConcurrentDeliberationService(orch)
    result = await service.invoke_concurrent(make_requests(1), hedge=HedgePolicy(delay=1.0))
    assert [f.kind for f in result.failures] == [FailureKind.ERROR]
    assert orch.calls == {"archon-1": 1} and result.hedged_agents == ()


async def test_if_both_calls_fail_the_first_calls_failure_stands(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = PerCall({"archon-1": [Call(3.0, fails=True), Call(1.0, fails=True)]})
    service = ConcurrentDeliberationService(orch)
    result = await service.invoke_concurrent(make_requests(1), hedge=HedgePolicy(delay=1.0))
    (failure,) = result.failures
    assert failure.kind is FailureKind.ERROR and "call 1 of archon-1" in failure.message


async def test_hedge_budget_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    orch = PerCall({}, default=Call(10.0))
    service = ConcurrentDeliberationService(orch)
    result = await service.invoke_concurrent(
        make_requests(10), hedge=HedgePolicy(delay=1.0, budget=0.2)
    )
    assert len(result.hedged_agents) == 2
    assert sum(orch.calls.values()) == 12


@pytest.mark.parametrize("wait", ["rate_limit", "shared_capacity"])
async def test_hedge_budget_holds_when_every_delay_fires_in_the_same_tick(
    autojump_clock: trio.testing.MockClock, wait: str
) -> None:
    # Each hedge awaits before it may start (the rate limit's turn, or the shared
    # capacity's reserve, which checkpoints): 20 hedges due in one tick, budget for 1.
    orch = PerCall({}, default=Call(10.0))
    rate = RateLimit(1000.0, burst=100) if wait == "rate_limit" else None
    shared = ModelCapacity(100) if wait == "shared_capacity" else None
    service = ConcurrentDeliberationService(
        orch, pool=AgentPool(72, shared=shared), rate_limit=rate
    )
    result = await service.invoke_concurrent(
        make_requests(20), hedge=HedgePolicy(delay=1.0, budget=0.05)
    )
    assert len(result.hedged_agents) == 1
    assert sum(orch.calls.values()) == 21 and orch.max_in_flight == 21
    assert service.metrics.snapshot().hedges_launched == 1
    assert service.pool.available_count == 72
    assert shared is None or (shared.held == set() and shared.max_held == 21)


async def test_a_hedge_with_no_free_slot_gives_its_budget_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Two slots, three agents queued; budget for one hedge.  At 1 s the first two are due
    # a hedge, but archon-3 waits for a slot: neither starts.  archon-2 ends at 1.5 s and
    # archon-1 at 2 s; archon-3 (started at 1.5 s) is due at 2.5 s, with a slot free.
    orch = PerCall(
        {"archon-1": [Call(2.0)], "archon-2": [Call(1.5)], "archon-3": [Call(10.0), Call(1.0)]}
    )
    service = ConcurrentDeliberationService(orch, pool=AgentPool(2))
    result = await service.invoke_concurrent(
        make_requests(3), overflow="queue", hedge=HedgePolicy(delay=1.0, budget=0.3)
    )
    assert result.hedged_agents == ("archon-3",)
    assert result.outputs[2].content == "call 2"
    assert service.metrics.snapshot().hedges_launched == 1


class InStartOrder:
    """The n-th call to start, whichever agent makes it, waits ``latencies[n]`` seconds
    (trio starts the tasks of one tick in any order: the agents' order is not fixed)."""

    def __init__(self, latencies: Sequence[float]) -> None:
        self.latencies = latencies
        self.callers: list[str] = []

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.callers.append(agent_id)
        await trio.sleep(self.latencies[len(self.callers) - 1])
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="yes")


async def test_a_hedge_cancelled_while_waiting_for_the_rate_limit_gives_its_budget_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # One call every 2 s: the agents start at 0, 2 and 4 s.  The first one's hedge (due
    # at 1 s) waits behind the other two and is cancelled when its agent answers at
    # 2.5 s; the second one's (due at 3 s) then gets the budget's one hedge, at 6 s.
    orch = InStartOrder([2.5, 20.0, 1.5, 1.0])
    service = ConcurrentDeliberationService(orch, rate_limit=RateLimit(0.5))
    result = await service.invoke_concurrent(
        make_requests(3), hedge=HedgePolicy(delay=1.0, budget=0.3)
    )
    second = orch.callers[1]
    assert result.hedged_agents == (second,) and orch.callers[3] == second
    assert result.success_count == 3 and len(orch.callers) == 4
    assert service.metrics.snapshot().hedges_launched == 1


async def test_a_hedge_still_waiting_for_the_rate_limit_at_a_halt_never_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    orch = PerCall({}, default=Call(10.0))
    service = ConcurrentDeliberationService(orch, switch, rate_limit=RateLimit(0.1))

    async def trigger() -> None:
        await trio.sleep(5.0)  # archon-1's hedge (due at 1 s) waits for the limit until 10 s
        switch.halt("stop")

    exc = await expect_halt(
        lambda: service.invoke_concurrent(make_requests(1), hedge=HedgePolicy(delay=1.0)),
        trigger,
    )
    assert exc.partial is not None and exc.partial.hedged_agents == ()
    assert orch.calls == {"archon-1": 1}
    assert service.metrics.snapshot().hedges_launched == 0
    assert service.pool.available_count == 72 and service.active_count == 0


async def test_hedges_count_against_capacity_and_never_jump_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = PerCall({}, default=Call(10.0))
    service = ConcurrentDeliberationService(orch, pool=AgentPool(5))
    result = await service.invoke_concurrent(
        make_requests(4), hedge=HedgePolicy(delay=1.0, budget=1.0)
    )
    assert len(result.hedged_agents) == 1  # one free slot, one hedge
    assert orch.max_in_flight == 5

    queued = PerCall({}, default=Call(10.0))
    service = ConcurrentDeliberationService(queued, pool=AgentPool(2))
    result = await service.invoke_concurrent(
        make_requests(4), overflow="queue", hedge=HedgePolicy(delay=1.0, budget=1.0)
    )
    # At the first two agents' hedge delay, two agents wait for a slot: a hedge may not
    # take one first; at the last two's, no slot is free.
    assert result.success_count == 4 and queued.max_in_flight == 2
    assert result.hedged_agents == ()


async def test_halt_cancels_hedges_like_everything_else(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    orch = PerCall({}, default=Call(10.0))
    service = ConcurrentDeliberationService(orch, switch)

    async def trigger() -> None:
        await trio.sleep(2.0)
        switch.halt("stop")

    exc = await expect_halt(
        lambda: service.invoke_concurrent(make_requests(3), hedge=HedgePolicy(delay=1.0)),
        trigger,
    )
    assert exc.partial is not None and len(exc.partial.hedged_agents) == 1  # budget: 1 of 3
    (hedged,) = exc.partial.hedged_agents
    assert {f.kind for f in exc.partial.failures} == {FailureKind.HALTED}
    expected = [(f"archon-{i}", 1) for i in range(1, 4)] + [(hedged, 2)]
    assert sorted(orch.cancelled) == sorted(expected)
    assert service.pool.available_count == 72


async def test_the_witness_commits_only_the_winner(autojump_clock: trio.testing.MockClock) -> None:
    class Log:
        def __init__(self) -> None:
            self.outputs: list[AgentOutput] = []

        async def commit(self, output: AgentOutput) -> CommitReceipt:
            self.outputs.append(output)
            return CommitReceipt(output.output_id, output.content_hash, 1, "h", output.generated_at)

    orch = PerCall({"archon-1": [Call(10.0), Call(1.0)]})
    log = Log()
    service = ConcurrentDeliberationService(orch, witness=log)
    result = await service.invoke_concurrent(make_requests(1), hedge=HedgePolicy(delay=1.0))
    assert [o.content for o in log.outputs] == ["call 2"] == [o.content for o in result.outputs]


async def test_observed_delay_waits_for_enough_samples_then_uses_the_quantile(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = PerCall({}, default=Call(1.0))
    service = ConcurrentDeliberationService(orch)
    policy = HedgePolicy(quantile=0.5, min_samples=5, budget=1.0)
    orch.default = Call(1.0)
    result = await service.invoke_concurrent(make_requests(4), hedge=policy)
    assert result.hedged_agents == ()  # 0 samples before this batch
    result = await service.invoke_concurrent(make_requests(4, prefix="b"), hedge=policy)
    assert result.hedged_agents == ()  # 4 samples: still not enough
    # 8 samples of 1.0 s: the median is 1.0 s.  A slow agent is hedged at 1.0 s.
    orch.plan = {"c-1": [Call(5.0), Call(0.5)], "c-2": [Call(0.9)]}
    t0 = trio.current_time()
    result = await service.invoke_concurrent(make_requests(2, prefix="c"), hedge=policy)
    assert result.hedged_agents == ("c-1",)
    assert trio.current_time() - t0 == pytest.approx(1.5)


class HedgeAnswersInTheSameRound:
    """Each agent's first call answers at t=10 and, just before returning, releases its
    hedge, which then answers without another checkpoint: both calls finish in the same
    scheduling round, the first call first."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.first_done: dict[str, trio.Event] = {}

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        call = self.calls.get(agent_id, 0)
        self.calls[agent_id] = call + 1
        done = self.first_done.setdefault(agent_id, trio.Event())
        if call == 0:
            await trio.sleep(10.0)
            done.set()
        else:
            await done.wait()
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"call {call}")


async def test_hedges_won_counts_only_hedges_whose_answer_is_the_agents(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: a hedge that answered in the same round as the first call, after it, was
    counted as won although the first call's output was the one released."""
    service = ConcurrentDeliberationService(HedgeAnswersInTheSameRound())
    hedge = HedgePolicy(delay=5.0, budget=1.0)
    result = await service.invoke_concurrent(make_requests(3), hedge=hedge)
    assert [o.content for o in result.outputs] == ["call 0"] * 3
    assert len(result.hedged_agents) == 3
    snapshot = service.metrics.snapshot()
    assert snapshot.hedges_launched == 3
    assert snapshot.hedges_won == 0


async def test_a_slow_async_report_does_not_hold_the_batch_past_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    plan = {"archon-1": Step(latency=1.0)}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan, default=Step(5.0)))
    reports = Reports(pause=3600.0)  # a display that hangs for an hour
    result = await service.invoke_concurrent(make_requests(3), deadline=2.0, on_progress=reports)
    assert trio.current_time() == pytest.approx(2.0)  # the deadline, not an hour later
    assert [o.agent_id for o in result.outputs] == ["archon-1"]
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}
    assert reports.begun_completed() == {"archon-1"} and reports.seen == []


async def test_a_report_still_running_when_the_batch_ends_is_cut_at_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(1.0)))
    reports = Reports(pause=3600.0)
    result = await service.invoke_concurrent(make_requests(2), deadline=5.0, on_progress=reports)
    assert trio.current_time() == pytest.approx(5.0)  # every agent done at 1 s; cut at 5 s
    assert result.success_count == 2
    assert reports.begun_completed() == {"archon-1", "archon-2"} and reports.seen == []
