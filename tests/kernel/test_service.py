"""ConcurrentDeliberationService: admission, outcomes, cancellation, bad input."""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentInvocationError,
    AgentOutput,
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support.helpers import (
    ScriptedOrchestrator,
    Step,
    expect_halt,
    make_context,
    make_requests,
)
from tests.support.hostile_parts import (
    HUGE,
    TEN_MINUTES,
    assert_pool_clean,
    halt_after,
)

# ------------------------------------------------------------------ outcomes


async def test_failures_are_logged_with_ids_and_never_content(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = AgentOrchestratorStub(latency_ms=1, fail_agents={"archon-1"})
    service = ConcurrentDeliberationService(stub)
    context = make_context("secret-topic")
    requests = make_requests(3, context)
    result = await service.invoke_concurrent(requests)
    failed = [r for r in caplog.records if r.message == "agent failed"]
    assert len(failed) == 1
    assert failed[0].levelno == logging.WARNING
    assert failed[0].agent_id == "archon-1"  # type: ignore[attr-defined]
    assert failed[0].failure_kind == "error"  # type: ignore[attr-defined]
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for out in result.outputs:
        assert out.content not in everything
    assert context.topic_content not in everything


# ------------------------------------------------------------------ invoke_single


async def test_invoke_single_returns_output_or_raises_with_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stub = AgentOrchestratorStub(latency_ms=5, fail_agents={"archon-2"})
    pool = AgentPool()
    service = ConcurrentDeliberationService(stub, pool=pool)
    ok, bad = make_requests(2)
    output = await service.invoke_single(ok)
    assert output.request_id == ok.request_id and output.batch_id is not None
    with pytest.raises(AgentInvocationError, match="archon-2") as info:
        await service.invoke_single(bad)
    assert info.value.failure is not None
    assert info.value.failure.kind is FailureKind.ERROR
    assert pool.active_count == 0
    with pytest.raises(InvalidRequestError):
        await service.invoke_single("archon-1")  # type: ignore[arg-type]


# ------------------------------------------------------------------ release on every path


# ------------------------------------------------------------------ admission


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        ("archon-1", "sequence of AgentRequest"),
        (None, "sequence of AgentRequest"),
        (42, "sequence of AgentRequest"),
        (["archon-1"], r"requests\[0\] must be an AgentRequest"),
    ],
)
async def test_bad_request_collections_are_refused(
    service: ConcurrentDeliberationService,
    stub: AgentOrchestratorStub,
    pool: AgentPool,
    requests: object,
    match: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        await service.invoke_concurrent(requests)  # type: ignore[arg-type]
    assert stub.get_invocation_count() == 0 and pool.active_count == 0


async def test_duplicates_are_refused_and_nothing_changes(
    service: ConcurrentDeliberationService, stub: AgentOrchestratorStub, pool: AgentPool
) -> None:
    reqs = make_requests(3)
    dup = [*reqs, AgentRequest("archon-2", reqs[0].context)]
    with pytest.raises(InvalidRequestError, match="'archon-2' appears twice"):
        await service.invoke_concurrent(dup)
    same_request = [reqs[0], reqs[0]]
    with pytest.raises(InvalidRequestError):
        await service.invoke_concurrent(same_request)
    assert stub.get_invocation_count() == 0 and pool.active_count == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overflow": "drop"}, "overflow"),
        ({"agent_timeout": 0}, "agent_timeout"),
        ({"agent_timeout": -1}, "agent_timeout"),
        ({"agent_timeout": "5"}, "agent_timeout"),
        ({"agent_timeout": math.nan}, "agent_timeout"),
        ({"on_progress": 3}, "on_progress"),
    ],
)
async def test_bad_options_are_refused(
    service: ConcurrentDeliberationService,
    stub: AgentOrchestratorStub,
    kwargs: dict[str, Any],
    match: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        await service.invoke_concurrent(make_requests(2), **kwargs)
    assert stub.get_invocation_count() == 0


def test_bad_constructor_arguments() -> None:
    stub = AgentOrchestratorStub()
    with pytest.raises(InvalidRequestError, match="orchestrator"):
        ConcurrentDeliberationService(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="halt_checker"):
        ConcurrentDeliberationService(stub, halt_checker=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="pool"):
        ConcurrentDeliberationService(stub, pool=72)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="halt_poll_interval"):
        ConcurrentDeliberationService(stub, halt_poll_interval=0)
    with pytest.raises(InvalidRequestError, match="agent_timeout"):
        ConcurrentDeliberationService(stub, agent_timeout=-2)
    with pytest.raises(InvalidRequestError, match="witness"):
        ConcurrentDeliberationService(stub, witness=object())  # type: ignore[arg-type]


# ------------------------------------------------------------------ witness (commit before view)


# ------------------------------------------------------------------ metrics


async def test_mid_flight_halt_cancels_all_72_at_once(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=TEN_MINUTES))
    service = ConcurrentDeliberationService(orch, halt, pool)
    requests = make_requests(72)
    t0 = trio.current_time()
    err = await expect_halt(
        lambda: service.invoke_concurrent(requests), lambda: halt_after(halt, 1.0)
    )
    halted_at = t0 + 1.0
    assert trio.current_time() == pytest.approx(halted_at)  # no waiting for the slow agents
    assert err.reason == "stop now"
    assert err.partial is not None
    assert err.partial.success_count == 0
    assert err.partial.failure_count == 72
    assert all(f.kind is FailureKind.HALTED for f in err.partial.failures)
    assert [f.agent_id for f in err.partial.failures] == [r.agent_id for r in requests]
    assert all(f.elapsed_ms == pytest.approx(1000.0) for f in err.partial.failures)
    assert sorted(orch.cancelled) == sorted(r.agent_id for r in requests)
    assert all(t <= halted_at for _, t in orch.starts)
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0
    assert service.metrics.snapshot().halted_batches == 1


async def test_mid_flight_halt_keeps_outputs_of_finished_agents(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch, pool: AgentPool
) -> None:
    quick = {f"archon-{i}": Step(latency=0.5) for i in range(1, 11)}
    orch = ScriptedOrchestrator(quick, default=Step(latency=TEN_MINUTES))
    service = ConcurrentDeliberationService(orch, halt, pool)
    requests = make_requests(72)
    err = await expect_halt(
        lambda: service.invoke_concurrent(requests), lambda: halt_after(halt, 1.0)
    )
    partial = err.partial
    assert partial is not None
    assert [o.agent_id for o in partial.outputs] == [f"archon-{i}" for i in range(1, 11)]
    assert all(o.batch_id == partial.batch_id for o in partial.outputs)
    assert partial.failure_count == 62
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    assert pool.active_count == 0


async def test_halt_from_another_thread(
    mock_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    # The clock does not move on its own: the agents would wait forever but for the halt.
    orch = ScriptedOrchestrator(default=Step(latency=TEN_MINUTES))
    pool = AgentPool()
    service = ConcurrentDeliberationService(orch, halt, pool)
    token = trio.lowlevel.current_trio_token()

    def operator() -> None:
        trio.from_thread.run_sync(halt.halt, "from the console thread", trio_token=token)

    async def halt_once_running() -> None:
        while orch.in_flight < 72:
            await trio.lowlevel.checkpoint()
        await trio.to_thread.run_sync(operator)

    err = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), halt_once_running)
    assert re.search("from the console thread", str(err))
    assert pool.active_count == 0


async def test_clear_lets_the_service_run_again(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    service = ConcurrentDeliberationService(ScriptedOrchestrator(), halt)
    halt.halt("maintenance")
    with pytest.raises(SystemHaltedError):
        await service.invoke_concurrent(make_requests(1))
    halt.clear(approvers={"alice", "bob"}, reason="maintenance done")
    result = await service.invoke_concurrent(make_requests(1))
    assert isinstance(result.outputs[0], AgentOutput)


@pytest.mark.parametrize(
    ("tail", "name"),
    [
        ({"deadline": HUGE}, "deadline"),
        ({"quorum": 10**5000}, "quorum"),  # past Python's int-to-text limit
        ({"quorum": -(10**5000)}, "quorum"),
        ({"agent_timeout": -(10**5000)}, "agent_timeout"),
    ],
)
async def test_huge_ints_for_a_batch_are_refused_before_anything_runs(
    autojump_clock: trio.testing.MockClock, tail: dict[str, Any], name: str
) -> None:
    """Guards against: ``OverflowError``, or ``ValueError: Exceeds the limit (4300 digits) for
    integer string conversion`` from formatting the error message itself."""
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator)
    with pytest.raises(InvalidRequestError, match=name):
        await service.invoke_concurrent(make_requests(2), **tail)
    assert orchestrator.invoked == []
    assert_pool_clean(service)
