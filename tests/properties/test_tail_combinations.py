"""Hypothesis: tail control in every combination, with failures and halts mixed in.

Random batches (per-call latencies, failing calls), either overflow mode, random
capacity, and any mix of deadline, quorum, hedging, a halt, a rate limit, a shared
capacity (an in-process model whose reserve checkpoints) and a sync or async
``on_progress``.  Whatever happens: one outcome per request in request order;
``CANCELLED`` only with a quorum, and then exactly ``quorum`` successes; a deadline
``TIMEOUT`` only once the deadline has passed; calls in flight (hedges included) never
exceed the capacity, local or shared; the hedge budget holds; nothing starts after a
halt; every released output had its ``completed`` report; the pool and the shared
leases end empty.
"""

from __future__ import annotations

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
    RateLimit,
)
from tests.support.helpers import (
    assert_one_outcome_per_request_in_order,
    make_requests,
    run_with_halt_at,
)
from tests.support.model_capacity import BatchModelCapacity, ModelCapacity

#: How long an async ``on_progress`` report takes.
REPORT_MS = 1.0


@dataclass
class Scenario:
    overflow: str
    capacity: int
    calls: list[list[tuple[int, bool]]]  # per agent, per call: (latency ms, fails)
    deadline_ms: float | None
    quorum: int | None
    hedge: HedgePolicy | None
    halt_at_ms: float | None
    rate: tuple[float, int] | None  # (per_second, burst)
    shared: int | None  # the shared capacity
    batch_admission: bool  # it takes a queue batch's leases in one call
    progress: str | None  # "sync" or "async"


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
        rate=draw(st.none() | st.tuples(st.sampled_from([2.0, 10.0, 100.0]), st.integers(1, 4))),
        # Reject mode takes every lease at once: a shared capacity below the batch refuses it.
        shared=draw(st.none() | st.integers(max(1, len(calls)) if overflow == "reject" else 1, 24)),
        batch_admission=draw(st.booleans()),
        progress=draw(st.sampled_from([None, "sync", "async"])),
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
    model = BatchModelCapacity if scenario.batch_admission else ModelCapacity
    shared = None if scenario.shared is None else model(scenario.shared)
    pool = AgentPool(scenario.capacity, shared=shared)
    rate = None if scenario.rate is None else RateLimit(scenario.rate[0], burst=scenario.rate[1])
    service = ConcurrentDeliberationService(orch, switch, pool, rate_limit=rate)
    completed: list[str] = []

    def sync_progress(done: int, total: int, agent_id: str, status: str) -> None:
        if status == "completed":
            completed.append(agent_id)

    async def async_progress(done: int, total: int, agent_id: str, status: str) -> None:
        sync_progress(done, total, agent_id, status)  # the report is made...
        await trio.sleep(REPORT_MS / 1000.0)  # ... and a stop may come meanwhile

    progress = {None: None, "sync": sync_progress, "async": async_progress}[scenario.progress]

    async def batch() -> ConcurrentResult:
        return await service.invoke_concurrent(
            requests,
            overflow="queue" if scenario.overflow == "queue" else "reject",
            deadline=None if scenario.deadline_ms is None else scenario.deadline_ms / 1e3,
            quorum=scenario.quorum,
            hedge=scenario.hedge,
            on_progress=progress,
        )

    result, halted, elapsed = run_with_halt_at(batch, switch, scenario.halt_at_ms)
    assert_one_outcome_per_request_in_order(requests, result)

    kinds = [f.kind for f in result.failures]
    # CANCELLED only with a quorum, and only once it was reached.
    if FailureKind.CANCELLED in kinds:
        assert scenario.quorum is not None and result.success_count == scenario.quorum
        assert not halted
    # A deadline TIMEOUT only once the deadline has passed; the batch returns by the
    # deadline, async reports still running included.
    returns_by = (scenario.deadline_ms or 0.0) + 1e-6
    deadline_timeouts = [f for f in result.failures if "batch deadline" in f.message]
    if deadline_timeouts:
        assert scenario.deadline_ms is not None
        assert all(f.kind is FailureKind.TIMEOUT for f in deadline_timeouts)
        assert scenario.deadline_ms - 1e-6 <= elapsed * 1000.0 <= returns_by
    if scenario.deadline_ms is not None:
        assert elapsed * 1000.0 <= returns_by
    # HALTED only when halted.
    assert (FailureKind.HALTED in kinds) == halted

    # Every released output was reported, and nothing else.
    if progress is not None:
        assert sorted(completed) == sorted(o.agent_id for o in result.outputs)

    # Capacity counts calls, hedges included; the budget holds; the pool ends empty.
    assert orch.max_in_flight <= scenario.capacity
    if shared is not None:
        assert orch.max_in_flight <= shared.max_held <= shared.capacity
        assert shared.held == set() and not shared.waiting
    budget = scenario.hedge.max_hedged(len(requests)) if scenario.hedge else 0
    assert len(result.hedged_agents) <= budget
    assert service.metrics.snapshot().hedges_launched == len(result.hedged_agents)
    assert sum(orch.calls.values()) == len(orch.calls) + len(result.hedged_agents)
    assert orch.started_after_halt == 0
    assert pool.active_count == 0 and pool.available_count == scenario.capacity
    assert not pool.queued_agents
