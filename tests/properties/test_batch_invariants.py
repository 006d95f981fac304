"""Hypothesis: the kernel's invariants over random batches, on a virtual clock.

For any batch (0-72 agents, random latencies, failures, timeouts, an optional halt at a
random virtual time, either overflow mode or sequential): every request has exactly one
outcome, outputs and failures are in request order and correctly stamped, the pool ends
empty, no more than ``max_concurrent`` agents are ever in flight, and nothing starts
after the halt.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentFailure,
    AgentOutput,
    AgentPool,
    AgentPoolExhaustedError,
    AgentRequest,
    ConcurrentDeliberationService,
    ConcurrentResult,
    FailureKind,
    HaltSwitch,
)
from tests.support.helpers import (
    ScriptedOrchestrator,
    Step,
    assert_one_outcome_per_request_in_order,
    make_requests,
    run_with_halt_at,
)

ACTIONS = ["ok", "ok", "ok", "error", "invalid", "wrong_agent"]
PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@dataclass
class Scenario:
    mode: str  # reject | queue | sequential
    capacity: int
    steps: list[Step]
    timeout_ms: float | None
    halt_at_ms: float | None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    mode = draw(st.sampled_from(["reject", "queue", "sequential"]))
    n = draw(st.integers(0, 72))
    capacity = 72 if mode == "reject" else draw(st.integers(1, 72))
    # Whole milliseconds for latencies, +0.5 ms for timeouts, +0.25 ms for the halt:
    # no two events ever tie, so the expected outcome of each agent is exact.
    steps = [
        Step(latency=draw(st.integers(0, 3000)) / 1000.0, action=draw(st.sampled_from(ACTIONS)))
        for _ in range(n)
    ]
    timeout = draw(st.none() | st.integers(0, 3000).map(lambda ms: ms + 0.5))
    halt_at = draw(st.none() | st.integers(0, 4000).map(lambda ms: ms + 0.25))
    return Scenario(mode, capacity, steps, timeout, halt_at)


def _run(
    scenario: Scenario,
) -> tuple[ConcurrentResult, bool, ScriptedOrchestrator, AgentPool, list[AgentRequest]]:
    requests = make_requests(len(scenario.steps))
    plan = {r.agent_id: s for r, s in zip(requests, scenario.steps, strict=True)}
    orch = ScriptedOrchestrator(plan)
    pool = AgentPool(scenario.capacity)
    switch = HaltSwitch()
    timeout = scenario.timeout_ms / 1000.0 if scenario.timeout_ms is not None else None
    service = ConcurrentDeliberationService(orch, switch, pool, agent_timeout=timeout)

    async def batch() -> ConcurrentResult:
        if scenario.mode == "sequential":
            return await service.invoke_sequential(requests)
        return await service.invoke_concurrent(
            requests, overflow="queue" if scenario.mode == "queue" else "reject"
        )

    result, halted, _ = run_with_halt_at(batch, switch, scenario.halt_at_ms)
    return result, halted, orch, pool, requests


def _expected_kind(step: Step, timeout_ms: float | None) -> FailureKind | None:
    """The outcome of an agent that is not halted (None: an output)."""
    if timeout_ms is not None and timeout_ms < step.latency * 1000.0:
        return FailureKind.TIMEOUT
    return {
        "ok": None,
        "error": FailureKind.ERROR,
        "invalid": FailureKind.INVALID_OUTPUT,
        "wrong_agent": FailureKind.INVALID_OUTPUT,
    }[step.action]


@PROPERTY_SETTINGS
@given(scenarios())
def test_every_request_has_exactly_one_outcome(scenario: Scenario) -> None:
    result, halted, orch, pool, requests = _run(scenario)
    index = {r.agent_id: i for i, r in enumerate(requests)}

    # one outcome each, in request order
    assert result.total_count == len(requests)
    assert_one_outcome_per_request_in_order(requests, result)

    # stamps
    for out in result.outputs:
        assert out.request_id == requests[index[out.agent_id]].request_id
        assert out.batch_id == result.batch_id
    for failure in result.failures:
        assert failure.request_id == requests[index[failure.agent_id]].request_id

    # the pool ends empty; capacity was never exceeded
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0 and not pool.queued_agents
    assert orch.max_in_flight <= scenario.capacity
    if scenario.mode == "sequential":
        assert orch.max_in_flight <= 1

    # halt: nothing starts after it; HALTED only when halted
    kinds = [f.kind for f in result.failures]
    if halted:
        assert scenario.halt_at_ms is not None
        assert all(t * 1000.0 <= scenario.halt_at_ms for _, t in orch.starts)
    else:
        assert FailureKind.HALTED not in kinds

    # each agent's outcome is the one its script and the timeout call for
    outcomes: dict[str, AgentOutput | AgentFailure] = {o.agent_id: o for o in result.outputs}
    outcomes.update({f.agent_id: f for f in result.failures})
    for req, step in zip(requests, scenario.steps, strict=True):
        got = outcomes[req.agent_id]
        got_kind = got.kind if isinstance(got, AgentFailure) else None
        if got_kind is FailureKind.HALTED:
            continue
        assert got_kind == _expected_kind(step, scenario.timeout_ms)

    # all agents start at once when admitted whole: the halt decides exactly who is HALTED
    if scenario.mode == "reject" and scenario.halt_at_ms is not None:
        for req, step in zip(requests, scenario.steps, strict=True):
            finish_ms = step.latency * 1000.0
            if scenario.timeout_ms is not None:
                finish_ms = min(finish_ms, scenario.timeout_ms)
            got = outcomes[req.agent_id]
            was_halted = isinstance(got, AgentFailure) and got.kind is FailureKind.HALTED
            assert was_halted is (scenario.halt_at_ms < finish_ms)


@PROPERTY_SETTINGS
@given(
    n=st.integers(0, 72),
    capacity=st.integers(1, 72),
    latency_ms=st.integers(0, 50),
    jitter_ms=st.integers(0, 50),
    seed=st.integers(0, 2**16),
    fail=st.sets(st.integers(1, 72), max_size=20),
    halt_at_ms=st.none() | st.integers(0, 120).map(lambda ms: ms + 0.25),
)
def test_stub_never_exceeds_capacity_and_nothing_starts_after_halt(
    n: int,
    capacity: int,
    latency_ms: int,
    jitter_ms: int,
    seed: int,
    fail: set[int],
    halt_at_ms: float | None,
) -> None:
    stub = AgentOrchestratorStub(
        latency_ms=latency_ms,
        fail_agents={f"archon-{i}" for i in fail},
        jitter_ms=jitter_ms,
        seed=seed,
    )
    pool = AgentPool(capacity)
    switch = HaltSwitch()
    service = ConcurrentDeliberationService(stub, switch, pool)
    requests = make_requests(n)

    async def batch() -> ConcurrentResult:
        return await service.invoke_concurrent(requests, overflow="queue")

    result, _, _ = run_with_halt_at(batch, switch, halt_at_ms)
    assert result.total_count == n
    assert stub.max_in_flight <= capacity
    assert pool.active_count == 0
    failed = {f.agent_id for f in result.failures if f.kind is FailureKind.ERROR}
    assert failed <= {f"archon-{i}" for i in fail}
    if halt_at_ms is not None:
        assert all(t * 1000.0 <= halt_at_ms for t in stub.start_times)


@PROPERTY_SETTINGS
@given(
    capacity=st.integers(1, 72),
    batches=st.lists(
        st.tuples(st.integers(0, 120), st.sampled_from(["queue", "reject"])), min_size=1, max_size=4
    ),
    latency_ms=st.integers(1, 30),
    jitter_ms=st.integers(0, 30),
    seed=st.integers(0, 1000),
)
def test_concurrent_batches_share_capacity(
    capacity: int,
    batches: list[tuple[int, str]],
    latency_ms: int,
    jitter_ms: int,
    seed: int,
) -> None:
    """Several batches on one pool at once: queued ones all finish, refused ones invoke
    nothing, and the pool's capacity holds across all of them."""
    stub = AgentOrchestratorStub(latency_ms=latency_ms, jitter_ms=jitter_ms, seed=seed)
    pool = AgentPool(capacity)
    service = ConcurrentDeliberationService(stub, pool=pool)
    outcomes: dict[int, ConcurrentResult | str] = {}

    async def run(i: int, n: int, overflow: str) -> None:
        await trio.sleep(i * 0.001)  # staggered starts, deterministic on the virtual clock
        try:
            outcomes[i] = await service.invoke_concurrent(
                make_requests(n, prefix=f"b{i}"),
                overflow="queue" if overflow == "queue" else "reject",
            )
        except AgentPoolExhaustedError:
            outcomes[i] = "refused"

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for i, (n, overflow) in enumerate(batches):
                nursery.start_soon(run, i, n, overflow)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert stub.max_in_flight <= capacity
    assert pool.active_count == 0 and not pool.queued_agents
    invoked = stub.get_invocation_count()
    expected = 0
    for i, (n, overflow) in enumerate(batches):
        outcome = outcomes[i]
        if overflow == "queue":
            assert isinstance(outcome, ConcurrentResult) and outcome.success_count == n
        if isinstance(outcome, ConcurrentResult):
            assert outcome.total_count == n
            expected += n
        else:
            assert overflow == "reject"
            assert all(stub.get_invocation_count(f"b{i}-{j}") == 0 for j in range(1, n + 1))
    assert invoked == expected
