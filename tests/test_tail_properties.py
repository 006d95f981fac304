"""Hypothesis: tail control in every combination, with failures and halts mixed in.

Random batches (per-call latencies, failing calls), either overflow mode, random
capacity, and any mix of deadline, quorum, hedging and a halt.  Whatever happens: one
outcome per request in request order; ``CANCELLED`` only with a quorum, and then exactly
``quorum`` successes; a deadline ``TIMEOUT`` only once the deadline has passed; calls in
flight (hedges included) never exceed the capacity; the hedge budget holds; nothing starts
after a halt; the pool ends empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from uuid import uuid4

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
)
from tests.helpers import assert_one_outcome_per_request_in_order, make_requests, run_with_halt_at


@dataclass
class Scenario:
    overflow: str
    capacity: int
    calls: list[list[tuple[int, bool]]]  # per agent, per call: (latency ms, fails)
    deadline_ms: float | None
    quorum: int | None
    hedge: HedgePolicy | None
    halt_at_ms: float | None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    call = st.tuples(st.integers(0, 3000), st.sampled_from([False, False, False, True]))
    calls = draw(st.lists(st.lists(call, min_size=1, max_size=2), max_size=20))
    overflow = draw(st.sampled_from(["reject", "queue"]))
    capacity = 72 if overflow == "reject" else draw(st.integers(1, 8))
    hedge = draw(
        st.none()
        | st.builds(
            HedgePolicy,
            delay=st.integers(1, 2000).map(lambda ms: ms / 1000.0 + 0.0001),
            budget=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
        )
    )
    return Scenario(
        overflow=overflow,
        capacity=capacity,
        calls=calls,
        deadline_ms=draw(st.none() | st.integers(1, 3000).map(lambda ms: ms + 0.5)),
        quorum=draw(st.none() | st.integers(1, max(1, len(calls)))) if calls else None,
        hedge=hedge,
        halt_at_ms=draw(st.none() | st.integers(0, 3000).map(lambda ms: ms + 0.25)),
    )


class Scripted:
    def __init__(self, plan: dict[str, list[tuple[int, bool]]], switch: HaltSwitch) -> None:
        self.plan = plan
        self.switch = switch
        self.calls: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.started_after_halt = 0

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        n = self.calls.get(agent_id, 0)
        self.calls[agent_id] = n + 1
        script = self.plan[agent_id]
        latency_ms, fails = script[min(n, len(script) - 1)]
        self.started_after_halt += self.switch.halted
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(latency_ms / 1000.0)
        finally:
            self.in_flight -= 1
        if fails:
            raise RuntimeError("scripted failure")
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="yes")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_tail_control_keeps_every_promise(scenario: Scenario) -> None:
    requests = make_requests(len(scenario.calls))
    switch = HaltSwitch()
    orch = Scripted({r.agent_id: c for r, c in zip(requests, scenario.calls, strict=True)}, switch)
    pool = AgentPool(scenario.capacity)
    service = ConcurrentDeliberationService(orch, switch, pool)

    async def batch() -> ConcurrentResult:
        return await service.invoke_concurrent(
            requests,
            overflow="queue" if scenario.overflow == "queue" else "reject",
            deadline=None if scenario.deadline_ms is None else scenario.deadline_ms / 1e3,
            quorum=scenario.quorum,
            hedge=scenario.hedge,
        )

    result, halted, elapsed = run_with_halt_at(batch, switch, scenario.halt_at_ms)
    assert_one_outcome_per_request_in_order(requests, result)

    kinds = [f.kind for f in result.failures]
    # CANCELLED only with a quorum, and only once it was reached.
    if FailureKind.CANCELLED in kinds:
        assert scenario.quorum is not None and result.success_count == scenario.quorum
        assert not halted
    # A deadline TIMEOUT only once the deadline has passed.
    deadline_timeouts = [f for f in result.failures if "batch deadline" in f.message]
    if deadline_timeouts:
        assert scenario.deadline_ms is not None
        assert all(f.kind is FailureKind.TIMEOUT for f in deadline_timeouts)
        assert math.isclose(elapsed * 1000.0, scenario.deadline_ms, abs_tol=1e-6)
    if scenario.deadline_ms is not None:
        assert elapsed * 1000.0 <= scenario.deadline_ms + 1e-6
    # HALTED only when halted.
    assert (FailureKind.HALTED in kinds) == halted

    # Capacity counts calls, hedges included; the budget holds; the pool ends empty.
    assert orch.max_in_flight <= scenario.capacity
    budget = scenario.hedge.max_hedged(len(requests)) if scenario.hedge else 0
    assert len(result.hedged_agents) <= budget
    assert sum(orch.calls.values()) == len(orch.calls) + len(result.hedged_agents)
    assert orch.started_after_halt == 0
    assert pool.active_count == 0 and pool.available_count == scenario.capacity
    assert not pool.queued_agents
