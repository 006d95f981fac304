"""Hypothesis: misbehaving orchestrators mixed with halts at random points.

Each agent of a random batch misbehaves in its own way (raises, hangs, swallows its
cancellation, returns garbage or another agent's output, returns after being cancelled,
lets a stray ``trio.Cancelled`` out, raises the halt itself), a witness takes a random
time per commit, and a halt lands at a random virtual time or from ``on_progress``.
Whatever happens: one outcome per request, nothing released after the halt (not to the
caller, not through ``on_progress``, not to the witness), the witness holds exactly the
released outputs, nothing starts after the halt, the pool ends empty and never holds
more than its capacity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from uuid import uuid4

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel import (
    AgentOutput,
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
)
from tests.support.helpers import (
    assert_one_outcome_per_request_in_order,
    make_requests,
    run_with_halt_at,
)
from tests.support.hostile_parts import Ledger

BEHAVIOURS = [
    "ok",
    "ok",
    "error",
    "hang",
    "swallow",  # returns an output when cancelled
    "late",  # ignores cancellation (shielded) and returns when it is done
    "garbage",
    "wrong_agent",
    "stray_cancel",  # raises a trio.Cancelled nobody asked for
    "halts",  # raises the halt itself, then returns an output
]


@dataclass
class Agent:
    behaviour: str
    latency_ms: int


@dataclass
class Scenario:
    mode: str
    capacity: int
    agents: list[Agent]
    commit_ms: int | None  # None: no witness
    timeout_ms: float | None
    halt_at_ms: float | None
    halt_at_done: int | None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    mode = draw(st.sampled_from(["reject", "queue", "sequential"]))
    agents = draw(
        st.lists(
            st.builds(Agent, st.sampled_from(BEHAVIOURS), st.integers(0, 400)),
            max_size=24,
        )
    )
    capacity = 72 if mode == "reject" else draw(st.integers(1, 8))
    timeout_ms = draw(st.none() | st.integers(0, 500).map(lambda ms: ms + 0.5))
    halt_at_ms = draw(st.none() | st.integers(0, 500).map(lambda ms: ms + 0.25))
    if timeout_ms is None and halt_at_ms is None and any(a.behaviour == "hang" for a in agents):
        halt_at_ms = 600.25  # something must end a hanging agent
    return Scenario(
        mode=mode,
        capacity=capacity,
        agents=agents,
        commit_ms=draw(st.none() | st.integers(0, 30)),
        timeout_ms=timeout_ms,
        halt_at_ms=halt_at_ms,
        halt_at_done=draw(st.none() | st.integers(1, 10)),
    )


@dataclass
class Hostile:
    """An orchestrator whose agents misbehave as scripted; records starts and flight."""

    plan: dict[str, Agent]
    switch: HaltSwitch
    in_flight: int = 0
    max_in_flight: int = 0
    starts_after_halt: list[str] = field(default_factory=list)

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        agent = self.plan[agent_id]
        if self.switch.halted:
            self.starts_after_halt.append(agent_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._behave(agent_id, agent)
        finally:
            self.in_flight -= 1

    async def _behave(self, agent_id: str, agent: Agent) -> AgentOutput:
        delay = agent.latency_ms / 1000.0
        output = AgentOutput(agent_id=agent_id, request_id=uuid4(), content="answer")
        match agent.behaviour:
            case "hang":
                await trio.sleep_forever()
            case "swallow":
                try:
                    await trio.sleep(delay)
                except trio.Cancelled:
                    return output
            case "late":
                with trio.CancelScope(shield=True):
                    await trio.sleep(delay)
            case _:
                await trio.sleep(delay)
        match agent.behaviour:
            case "error":
                raise RuntimeError("scripted")
            case "garbage":
                return {"not": "an output"}  # type: ignore[return-value]
            case "wrong_agent":
                return AgentOutput(agent_id="someone-else", request_id=uuid4(), content="x")
            case "stray_cancel":
                raise trio.Cancelled._create()
            case "halts":
                self.switch.halt("an agent raised the halt")
        return output


def assert_misbehaviour_named(
    requests: list[AgentRequest], scenario: Scenario, result: ConcurrentResult, halted: bool
) -> None:
    """Misbehaviour is named, never silent; HALTED only when halted."""
    kinds = {f.agent_id: f.kind for f in result.failures}
    for req, agent in zip(requests, scenario.agents, strict=True):
        kind = kinds.get(req.agent_id)
        if kind is FailureKind.HALTED:
            assert halted
        elif agent.behaviour in ("garbage", "wrong_agent"):
            assert kind in (FailureKind.INVALID_OUTPUT, FailureKind.TIMEOUT)
        elif agent.behaviour in ("error", "stray_cancel"):
            assert kind in (FailureKind.ERROR, FailureKind.TIMEOUT)
        elif agent.behaviour == "hang":
            assert kind is FailureKind.TIMEOUT
        elif agent.behaviour == "halts":
            # It raised the halt before returning: its own output is never released.
            assert kind is not None


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_promises_hold_with_hostile_orchestrators_and_random_halts(scenario: Scenario) -> None:
    requests = make_requests(len(scenario.agents))
    switch = HaltSwitch()
    orch = Hostile({r.agent_id: a for r, a in zip(requests, scenario.agents, strict=True)}, switch)
    pool = AgentPool(scenario.capacity)
    ledger = Ledger(scenario.commit_ms) if scenario.commit_ms is not None else None
    service = ConcurrentDeliberationService(
        orch,
        switch,
        pool,
        agent_timeout=None if scenario.timeout_ms is None else scenario.timeout_ms / 1000.0,
        witness=ledger,
    )
    reported: list[tuple[str, str, bool]] = []

    def progress(done: int, total: int, agent_id: str, status: str) -> None:
        reported.append((agent_id, status, switch.halted))
        if scenario.halt_at_done is not None and done == scenario.halt_at_done:
            switch.halt("halt from on_progress")

    async def batch() -> ConcurrentResult:
        if scenario.mode == "sequential":
            return await service.invoke_sequential(requests, on_progress=progress)
        return await service.invoke_concurrent(
            requests,
            overflow="queue" if scenario.mode == "queue" else "reject",
            on_progress=progress,
        )

    result, halted, _ = run_with_halt_at(batch, switch, scenario.halt_at_ms)
    assert_one_outcome_per_request_in_order(requests, result)

    # Nothing released after the halt: every released output was reported before it...
    released = {o.agent_id for o in result.outputs}
    completed = {agent for agent, status, _ in reported if status == "completed"}
    assert released == completed
    assert not any(status == "completed" and was_halted for _, status, was_halted in reported)
    # ... and the witness holds exactly what was released.
    if ledger is not None:
        assert {o.output_id for o in ledger.log} == {o.output_id for o in result.outputs}

    # Nothing starts after the halt; capacity held; the pool ends empty.
    assert orch.starts_after_halt == []
    assert orch.max_in_flight <= (1 if scenario.mode == "sequential" else scenario.capacity)
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0
    assert not pool.queued_agents

    assert_misbehaviour_named(requests, scenario, result, halted)
    if halted:
        assert switch.halted
