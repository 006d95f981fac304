"""The eight cases the design was validated on, as acceptance tests."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentPool,
    AgentPoolExhaustedError,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    SystemHaltedError,
)
from tests.support.helpers import make_requests


async def test_72_agents_complete_without_blocking(
    autojump_clock: trio.testing.MockClock,
    service: ConcurrentDeliberationService,
    stub: AgentOrchestratorStub,
) -> None:
    t0 = trio.current_time()
    result = await service.invoke_concurrent(make_requests(72))
    assert result.success_count == 72
    assert result.failure_count == 0
    assert stub.max_in_flight == 72  # all at once, none waited for another
    assert trio.current_time() - t0 == pytest.approx(0.010)


async def test_72_unique_outputs_with_full_set_of_agent_ids(
    autojump_clock: trio.testing.MockClock, service: ConcurrentDeliberationService
) -> None:
    requests = make_requests(72)
    result = await service.invoke_concurrent(requests)
    assert len({o.output_id for o in result.outputs}) == 72
    assert [o.agent_id for o in result.outputs] == [r.agent_id for r in requests]
    assert {o.agent_id for o in result.outputs} == {f"archon-{i}" for i in range(1, 73)}
    for request, output in zip(requests, result.outputs, strict=True):
        assert output.request_id == request.request_id
        assert output.batch_id == result.batch_id
        assert output.content.startswith("[DEV MODE] ")


async def test_concurrency_beats_sequential(autojump_clock: trio.testing.MockClock) -> None:
    stub = AgentOrchestratorStub(latency_ms=10.0)
    service = ConcurrentDeliberationService(stub)
    t0 = trio.current_time()
    concurrent = await service.invoke_concurrent(make_requests(10))
    concurrent_s = trio.current_time() - t0
    t1 = trio.current_time()
    sequential = await service.invoke_sequential(make_requests(10))
    sequential_s = trio.current_time() - t1

    assert concurrent.success_count == sequential.success_count == 10
    assert concurrent_s == pytest.approx(0.010)  # the slowest agent, not the sum
    assert sequential_s == pytest.approx(0.100)
    assert concurrent.total_ms == pytest.approx(10.0)


async def test_pool_released_after_success(
    autojump_clock: trio.testing.MockClock, service: ConcurrentDeliberationService, pool: AgentPool
) -> None:
    await service.invoke_concurrent(make_requests(72))
    assert pool.active_count == 0
    assert pool.available_count == 72
    assert pool.limiter.borrowed_tokens == 0


async def test_pool_released_after_partial_failure(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    stub = AgentOrchestratorStub(latency_ms=10.0, fail_agents={"archon-2", "archon-5", "archon-9"})
    service = ConcurrentDeliberationService(stub, pool=pool)
    result = await service.invoke_concurrent(make_requests(10))
    assert (result.success_count, result.failure_count) == (7, 3)
    assert pool.active_count == 0
    assert pool.available_count == 72


async def test_73_agents_refused_naming_fr10_and_invoking_nothing(
    service: ConcurrentDeliberationService, stub: AgentOrchestratorStub, pool: AgentPool
) -> None:
    with pytest.raises(AgentPoolExhaustedError, match=r"FR10") as info:
        await service.invoke_concurrent(make_requests(73))
    assert "0 active + 73 requested > 72" in str(info.value)
    assert stub.get_invocation_count() == 0
    assert pool.active_count == 0
    assert service.metrics.snapshot().pool_exhaustion_errors == 1


async def test_halted_system_refuses_and_invokes_nothing(
    service: ConcurrentDeliberationService, stub: AgentOrchestratorStub, halt: HaltSwitch
) -> None:
    halt.halt("operator stop")
    with pytest.raises(SystemHaltedError) as info:
        await service.invoke_concurrent(make_requests(5))
    assert info.value.reason == "operator stop"
    assert info.value.partial is None
    assert stub.get_invocation_count() == 0


async def test_failures_are_reported(autojump_clock: trio.testing.MockClock) -> None:
    failing = {"archon-3", "archon-7"}
    stub = AgentOrchestratorStub(latency_ms=10.0, fail_agents=failing)
    service = ConcurrentDeliberationService(stub)
    result = await service.invoke_concurrent(make_requests(10))
    assert result.failed_agents == ("archon-3", "archon-7")
    for failure in result.failures:
        assert failure.kind is FailureKind.ERROR
        assert failure.error_type == "AgentInvocationError"
        assert failure.agent_id in failure.message
        assert failure.elapsed_ms == pytest.approx(10.0)

    stub.set_fail_agents({f"archon-{i}" for i in range(1, 11)})
    everything_fails = await service.invoke_concurrent(make_requests(10))
    assert everything_fails.success_count == 0
    assert everything_fails.failure_count == 10
    assert everything_fails.total_count == 10
