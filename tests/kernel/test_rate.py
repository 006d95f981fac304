"""kernel.RateLimit on the virtual clock: rate, burst, fairness, cancellation, cost."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from kernel import (
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    RateLimit,
    RateLimitStatistics,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests


async def _times(limit: RateLimit, costs: list[float]) -> list[float]:
    """Start one acquirer per cost, in order; return when each got through."""
    t0 = trio.current_time()
    got: list[float] = [math.nan] * len(costs)

    async def one(i: int, cost: float) -> None:
        await limit.acquire(cost)
        got[i] = trio.current_time() - t0

    async with trio.open_nursery() as nursery:
        for i, cost in enumerate(costs):
            nursery.start_soon(one, i, cost)
            await trio.testing.wait_all_tasks_blocked()  # arrival order = index order
    return got


async def test_even_spacing_with_burst_one(autojump_clock: trio.testing.MockClock) -> None:
    times = await _times(RateLimit(10), [1.0] * 5)
    assert times == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])


async def test_a_burst_goes_at_once_then_the_rate_holds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times = await _times(RateLimit(2, burst=3), [1.0] * 6)
    assert times == pytest.approx([0.0, 0.0, 0.0, 0.5, 1.0, 1.5])


async def test_the_bucket_refills_while_idle_but_never_beyond_the_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit(1, burst=2)
    await _times(limit, [1.0, 1.0])
    await trio.sleep(100.0)  # idle: refills to 2, not 100
    assert await _times(limit, [1.0] * 4) == pytest.approx([0.0, 0.0, 1.0, 2.0])


async def test_fifo_a_cheap_request_never_overtakes_an_expensive_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times = await _times(RateLimit(1, burst=4), [4.0, 3.0, 0.5])
    # 4 at once; then 3 tokens take 3 s; the cheap one waits its turn behind it.
    assert times == pytest.approx([0.0, 3.0, 3.5])


async def test_a_cost_above_the_burst_waits_for_a_full_bucket_and_leaves_a_debt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    times = await _times(RateLimit(1, burst=2), [1.0, 5.0, 1.0])
    # t=0: 1 taken (1 left); 5 waits for a full bucket (t=1), leaving -3; 1 more at t=5.
    assert times == pytest.approx([0.0, 1.0, 5.0])


async def test_statistics_shows_the_bucket_refilled_to_now_without_changing_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit(2, burst=3)
    assert limit.statistics() == RateLimitStatistics(
        per_second=2.0, burst=3, tokens=3.0, tasks_waiting=0
    )
    await limit.acquire(3)
    await trio.sleep(0.5)  # one token back
    assert limit.statistics().tokens == pytest.approx(1.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(limit.acquire, 2.0)
        await trio.testing.wait_all_tasks_blocked()
        stats = limit.statistics()
        assert stats.tasks_waiting == 1 == limit.waiting
    # Asking changed nothing: the waiter got its 2 tokens at t=1.0 s, as without it.
    assert trio.current_time() == pytest.approx(1.0)
    assert limit.statistics().tokens == pytest.approx(0.0)


async def test_a_waiter_cancelled_while_waiting_consumes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit(1)
    await limit.acquire()
    t0 = trio.current_time()
    with trio.move_on_after(0.5) as scope:
        await limit.acquire()  # head of the queue, cancelled mid-wait
    assert scope.cancelled_caught and limit.waiting == 0
    await limit.acquire()
    assert trio.current_time() - t0 == pytest.approx(1.0)  # not 2.0: nothing was taken

    got: list[tuple[str, float]] = []

    async def waiter(name: str, scope: trio.CancelScope) -> None:
        with scope:
            await limit.acquire()
            got.append((name, trio.current_time() - t0))

    middle = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        for name, scope in (
            ("first", trio.CancelScope()),
            ("middle", middle),
            ("last", trio.CancelScope()),
        ):
            nursery.start_soon(waiter, name, scope)
            await trio.testing.wait_all_tasks_blocked()
        middle.cancel()  # not at the head: it leaves the queue, the last one moves up
    assert [name for name, _ in got] == ["first", "last"]
    assert [t for _, t in got] == pytest.approx([2.0, 3.0])


async def test_acquire_is_a_checkpoint_even_with_tokens(
    autojump_clock: trio.testing.MockClock,
) -> None:
    limit = RateLimit(1, burst=5)
    with trio.CancelScope() as scope:
        scope.cancel()
        await limit.acquire()
    assert scope.cancelled_caught
    assert await _times(limit, [5.0]) == [0.0]  # the cancelled call took nothing


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((0,), {}),
        ((-1,), {}),
        ((math.nan,), {}),
        ((math.inf,), {}),
        (("10",), {}),
        ((True,), {}),
        ((10,), {"burst": 0}),
        ((10,), {"burst": 1.5}),
    ],
)
def test_bad_limits_are_refused(args: tuple[object, ...], kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidRequestError):
        RateLimit(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("cost", [0, -1, math.nan, "1"])
async def test_bad_costs_are_refused(cost: object) -> None:
    limit = RateLimit(1)
    with pytest.raises(InvalidRequestError, match="cost"):
        await limit.acquire(cost)  # type: ignore[arg-type]
    assert limit.waiting == 0


# ---------------------------------------------------------------- the service paces starts


async def test_service_paces_agent_starts(autojump_clock: trio.testing.MockClock) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=5.0))
    service = ConcurrentDeliberationService(orch, rate_limit=RateLimit(10))
    t0 = trio.current_time()
    result = await service.invoke_concurrent(make_requests(20), agent_timeout=5.5)
    starts = sorted(t - t0 for _, t in orch.starts)
    assert starts == pytest.approx([i * 0.1 for i in range(20)])
    assert result.success_count == 20  # the timeout counts from after the wait


async def test_hedges_wait_for_the_rate_too(autojump_clock: trio.testing.MockClock) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    limit = RateLimit(1)
    service = ConcurrentDeliberationService(orch, rate_limit=limit)
    result = await service.invoke_concurrent(
        make_requests(3), hedge=HedgePolicy(delay=0.5, budget=1.0), deadline=4.5
    )
    t0 = orch.starts[0][1]
    # Agents start at 0, 1, 2 s; hedges become due at 0.5, 1.5, 2.5 s but queue behind.
    assert [round(t - t0, 6) for _, t in orch.starts] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert len(result.hedged_agents) == 2


async def test_a_halt_during_the_rate_wait_starts_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, switch, rate_limit=RateLimit(1))

    async def trigger() -> None:
        await trio.sleep(2.5)
        switch.halt("stop")

    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(6)), trigger)
    assert len(orch.starts) == 3 and exc.partial is not None
    not_started = [f for f in exc.partial.failures if f.message.startswith("not started")]
    assert len(not_started) == 3 and all(f.kind is FailureKind.HALTED for f in not_started)
    assert service.pool.available_count == 72


def test_service_refuses_a_rate_limit_of_the_wrong_type() -> None:
    with pytest.raises(InvalidRequestError, match="rate_limit"):
        ConcurrentDeliberationService(ScriptedOrchestrator(), rate_limit=10)  # type: ignore[arg-type]


def test_one_limit_serves_several_trio_runs() -> None:
    """Each trio.run has its own clock offset: a stamp from the last run must not put the
    bucket in a debt of years (the next acquire hung)."""
    limit = RateLimit(1000, burst=2)

    async def use() -> None:
        with trio.fail_after(5):
            for _ in range(4):
                await limit.acquire()

    for _ in range(3):
        trio.run(use)
