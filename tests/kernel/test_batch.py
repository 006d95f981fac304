"""One batch run: admission and scheduling modes, how it stops, every slot back on every path."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from kernel import (
    AgentBusyError,
    AgentPool,
    AgentPoolExhaustedError,
    AgentRequest,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    Overflow,
    SystemHaltedError,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import (
    Instant,
    InstantWitness,
    SlowWitness,
    SwallowsCancel,
    halt_after,
)


async def test_empty_batch_returns_empty_result(service: ConcurrentDeliberationService) -> None:
    result = await service.invoke_concurrent([])
    assert result.total_count == 0
    assert result.outputs == () and result.failures == ()


async def test_outer_cancellation_releases_pool_and_propagates(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=100.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    with trio.move_on_after(1.0) as scope:
        await service.invoke_concurrent(make_requests(72))
    assert scope.cancelled_caught
    assert len(orch.cancelled) == 72
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0


async def test_outer_cancellation_in_queue_mode_releases_claims(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = AgentPool(4)
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(1.0)), pool=pool)
    with trio.move_on_after(1.5):
        await service.invoke_concurrent(make_requests(20), overflow="queue")
    assert pool.active_count == 0 and pool.queued_agents == frozenset()
    assert pool.limiter.statistics().tasks_waiting == 0


async def test_keyboard_interrupt_propagates_and_releases_pool(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    plan = {"archon-3": Step(latency=1.0, action="keyboard_interrupt")}
    orch = ScriptedOrchestrator(plan, default=Step(latency=100.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    with pytest.raises(KeyboardInterrupt):
        await service.invoke_concurrent(make_requests(10))
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0
    assert len(orch.cancelled) == 9


async def test_agent_busy_in_another_batch_is_refused(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    first = make_requests(5)
    second = [AgentRequest("archon-3", first[0].context), AgentRequest("other", first[0].context)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, first)
        await trio.sleep(1.0)
        overflows: tuple[Overflow, ...] = ("reject", "queue")
        for overflow in overflows:
            with pytest.raises(AgentBusyError, match=r"FR10.*'archon-3'"):
                await service.invoke_concurrent(second, overflow=overflow)
        assert pool.active_agents == {r.agent_id for r in first}
    assert "other" not in orch.invoked
    assert pool.active_count == 0


async def test_two_batches_over_capacity_one_is_refused(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    a, b = make_requests(40, prefix="a"), make_requests(40, prefix="b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, a)
        await trio.sleep(1.0)
        with pytest.raises(AgentPoolExhaustedError, match=r"FR10.*40 active \+ 40 requested > 72"):
            await service.invoke_concurrent(b)
    assert not any(x.startswith("b-") for x in orch.invoked)
    assert orch.max_in_flight == 40


async def test_two_queued_batches_both_finish_within_capacity(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    results = {}

    async def run(name: str) -> None:
        results[name] = await service.invoke_concurrent(
            make_requests(40, prefix=name), overflow="queue"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a")
        nursery.start_soon(run, "b")
    assert results["a"].success_count == results["b"].success_count == 40
    assert orch.max_in_flight == 72
    assert trio.current_time() == pytest.approx(20.0)  # two waves of 10 s
    assert pool.active_count == 0


async def test_queue_mode_runs_fifo_in_waves(autojump_clock: trio.testing.MockClock) -> None:
    pool = AgentPool(72)
    orch = ScriptedOrchestrator(default=Step(latency=0.010))
    service = ConcurrentDeliberationService(orch, pool=pool)
    requests = make_requests(1000)
    result = await service.invoke_concurrent(requests, overflow="queue")
    assert result.success_count == 1000
    assert orch.max_in_flight == 72
    assert result.total_ms == pytest.approx(math.ceil(1000 / 72) * 10.0)
    # FIFO: the first wave is the first 72 requests
    first_wave = {a for a, t in orch.starts if t == 0.0}
    assert first_wave == {r.agent_id for r in requests[:72]}


async def test_reject_mode_waits_behind_nothing_when_queue_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A queueing batch holding every slot makes a reject-mode batch fail fast."""
    pool = AgentPool(10)
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(1.0)), pool=pool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: service.invoke_concurrent(make_requests(30, prefix="q"), overflow="queue")
        )
        await trio.sleep(0.5)
        with pytest.raises(AgentPoolExhaustedError, match="10 active"):
            await service.invoke_concurrent(make_requests(1, prefix="r"))


async def test_queued_agents_never_start_after_halt(
    autojump_clock: trio.testing.MockClock, halt: HaltSwitch
) -> None:
    pool = AgentPool(10)
    orch = ScriptedOrchestrator(default=Step(latency=3.0))
    service = ConcurrentDeliberationService(orch, halt, pool)
    requests = make_requests(50)
    err = await expect_halt(
        lambda: service.invoke_concurrent(requests, overflow="queue"),
        lambda: halt_after(halt, 7.0),
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
        lambda: service.invoke_sequential(make_requests(4)), lambda: halt_after(halt, 15.0)
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


async def test_output_returned_after_the_halt_is_halted_not_released(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    witness = SlowWitness(latency=0.0)
    service = ConcurrentDeliberationService(SwallowsCancel(), switch, witness=witness)

    async def trigger() -> None:
        await trio.sleep(1.0)
        switch.halt("operator stop")

    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(4)), trigger)
    assert exc.partial is not None and exc.partial.success_count == 0
    assert {f.kind for f in exc.partial.failures} == {FailureKind.HALTED}
    assert all("output withheld" in f.message for f in exc.partial.failures)
    assert witness.log == []  # nothing reached the witness either


async def test_instant_agents_and_a_halt_from_on_progress_release_only_what_came_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    witness = InstantWitness()
    service = ConcurrentDeliberationService(Instant(), switch, witness=witness)
    reported: list[tuple[str, bool]] = []

    def progress(done: int, total: int, agent_id: str, status: str) -> None:
        reported.append((status, switch.halted))
        if done == 2:
            switch.halt("enough")

    with pytest.raises(SystemHaltedError) as info:
        await service.invoke_concurrent(make_requests(30), on_progress=progress)
    partial = info.value.partial
    assert partial is not None and partial.total_count == 30
    assert partial.success_count == 2
    assert {o.output_id for o in partial.outputs} == {o.output_id for o in witness.log}
    assert ("completed", True) not in reported  # nothing reported as released after it
