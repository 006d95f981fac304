"""Halt is absolute: before a batch, during it, from any task, thread or channel."""

from __future__ import annotations

import re

import pytest
import trio
import trio.testing

from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    SystemHaltedError,
)
from tests.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests

TEN_MINUTES = 600.0


async def _halt_after(switch: HaltSwitch, delay: float, reason: str = "stop now") -> None:
    await trio.sleep(delay)
    switch.halt(reason)


async def test_mid_flight_halt_cancels_all_72_at_once(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=TEN_MINUTES))
    service = ConcurrentDeliberationService(orch, halt, pool)
    requests = make_requests(72)
    t0 = trio.current_time()
    err = await expect_halt(
        lambda: service.invoke_concurrent(requests), lambda: _halt_after(halt, 1.0)
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
        lambda: service.invoke_concurrent(requests), lambda: _halt_after(halt, 1.0)
    )
    partial = err.partial
    assert partial is not None
    assert [o.agent_id for o in partial.outputs] == [f"archon-{i}" for i in range(1, 11)]
    assert all(o.batch_id == partial.batch_id for o in partial.outputs)
    assert partial.failure_count == 62
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    assert pool.active_count == 0


async def test_queued_agents_never_start_after_halt(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    pool = AgentPool(10)
    orch = ScriptedOrchestrator(default=Step(latency=3.0))
    service = ConcurrentDeliberationService(orch, halt, pool)
    requests = make_requests(50)
    err = await expect_halt(
        lambda: service.invoke_concurrent(requests, overflow="queue"),
        lambda: _halt_after(halt, 7.0),
    )
    partial = err.partial
    assert partial is not None
    assert partial.success_count == 20
    assert partial.failure_count == 30
    not_started = [f for f in partial.failures if f.message.startswith("not started")]
    assert len(not_started) == 20 and all(f.elapsed_ms == 0.0 for f in not_started)
    assert len(orch.starts) == 30
    assert all(t <= 7.0 for _, t in orch.starts)
    assert pool.active_count == 0 and pool.queued_agents == frozenset()


async def test_agent_raising_the_halt_stops_every_later_start(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    """halt() called synchronously inside an agent: no agent starts after it."""
    orch = ScriptedOrchestrator(default=Step(latency=5.0))

    def halt_on_third(agent_id: str) -> None:
        if agent_id == "archon-3":
            halt.halt("agent found a problem")

    orch.on_start = halt_on_third
    service = ConcurrentDeliberationService(orch, halt)
    with pytest.raises(SystemHaltedError) as info:
        await service.invoke_concurrent(make_requests(72))
    err = info.value
    # trio starts tasks in an unspecified order; whatever came first, nothing came after.
    assert orch.invoked[-1] == "archon-3"
    assert len(orch.invoked) < 72
    assert err.partial is not None
    assert err.partial.failure_count == 72


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


class PolledChecker:
    """A halt channel with no wait_halted: the service must poll it."""

    def __init__(self) -> None:
        self.halted = False
        self.reads = 0

    async def is_halted(self) -> bool:
        self.reads += 1
        return self.halted

    async def get_halt_reason(self) -> str | None:
        return "polled halt" if self.halted else None


async def test_polled_checker_stops_batch_within_one_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    checker = PolledChecker()
    orch = ScriptedOrchestrator(default=Step(latency=TEN_MINUTES))
    pool = AgentPool()
    service = ConcurrentDeliberationService(orch, checker, pool, halt_poll_interval=0.05)

    async def flip() -> None:
        await trio.sleep(1.0)
        checker.halted = True

    t0 = trio.current_time()
    err = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), flip)
    assert re.search("polled halt", str(err))
    assert 1.0 <= trio.current_time() - t0 <= 1.0 + 0.05 + 1e-9
    assert pool.active_count == 0


class BrokenChecker:
    def __init__(self, fail_after: int = 0) -> None:
        self.calls = 0
        self.fail_after = fail_after

    async def is_halted(self) -> bool:
        self.calls += 1
        if self.calls > self.fail_after:
            raise OSError("halt channel unreadable")
        return False

    async def get_halt_reason(self) -> str | None:
        return None


async def test_unreadable_halt_checker_counts_as_halted() -> None:
    orch = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orch, BrokenChecker())
    with pytest.raises(SystemHaltedError, match="halt checker failed") as info:
        await service.invoke_concurrent(make_requests(3))
    assert info.value.partial is None
    assert orch.starts == []


async def test_checker_failing_mid_batch_halts_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=TEN_MINUTES))
    pool = AgentPool()
    service = ConcurrentDeliberationService(orch, BrokenChecker(fail_after=3), pool)
    with pytest.raises(SystemHaltedError, match="OSError") as info:
        await service.invoke_concurrent(make_requests(5))
    err = info.value
    assert err.partial is not None and err.partial.failure_count == 5
    assert pool.active_count == 0


async def test_sequential_checks_halt_before_every_turn(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, halt)
    seen: list[tuple[int, str, str]] = []

    def progress(done: int, total: int, agent_id: str, status: str) -> None:
        seen.append((done, agent_id, status))
        if agent_id == "archon-2" and status == "completed":
            halt.halt("between turns")

    with pytest.raises(SystemHaltedError) as info:
        await service.invoke_sequential(make_requests(5), on_progress=progress)
    err = info.value
    assert orch.invoked == ["archon-1", "archon-2"]
    partial = err.partial
    assert partial is not None
    assert [o.agent_id for o in partial.outputs] == ["archon-1", "archon-2"]
    assert partial.failed_agents == ("archon-3", "archon-4", "archon-5")
    assert seen == [
        (0, "archon-1", "starting"),
        (1, "archon-1", "completed"),
        (1, "archon-2", "starting"),
        (2, "archon-2", "completed"),
    ]


async def test_sequential_halt_mid_turn_cancels_the_running_agent(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    pool = AgentPool()
    service = ConcurrentDeliberationService(orch, halt, pool)
    err = await expect_halt(
        lambda: service.invoke_sequential(make_requests(4)), lambda: _halt_after(halt, 15.0)
    )
    assert orch.cancelled == ["archon-2"]
    partial = err.partial
    assert partial is not None
    assert partial.success_count == 1 and partial.failure_count == 3
    assert partial.failures[0].elapsed_ms == pytest.approx(5000.0)
    assert pool.active_count == 0


async def test_halt_after_everything_finished_returns_the_full_result(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    """A halt raised by the last agent's progress callback: nothing left to cancel."""
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, halt)

    def progress(done: int, total: int, agent_id: str, status: str) -> None:
        if done == total:
            halt.halt("late")

    result = await service.invoke_concurrent(make_requests(3), on_progress=progress)
    assert result.success_count == 3
    with pytest.raises(SystemHaltedError):
        await service.invoke_concurrent(make_requests(3))


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
