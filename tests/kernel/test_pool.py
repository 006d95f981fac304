"""AgentPool: atomic admission, the limiter it shares, a model-based stateful test, and
a SharedCapacity (FR10 across processes, against the in-memory model of the contract)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kernel import (
    AgentBusyError,
    AgentPool,
    AgentPoolExhaustedError,
    BatchAcquirer,
    ConcurrentDeliberationService,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    LeaseLossNotifier,
    PoolStatistics,
    PoolStatus,
    SharedCapacity,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.model_capacity import BatchModelCapacity, ModelCapacity


@pytest.mark.parametrize("bad", [0, -1, 1.5, "72", True, None])
def test_max_concurrent_must_be_a_positive_int(bad: object) -> None:
    with pytest.raises(InvalidRequestError):
        AgentPool(bad)  # type: ignore[arg-type]


def test_acquire_release() -> None:
    pool = AgentPool(2)
    assert pool.max_concurrent == 2 and pool.available_count == 2 and not pool.is_exhausted
    assert pool.acquire("a") is True
    assert pool.acquire("a") is False
    assert pool.is_active("a") and pool.active_agents == frozenset({"a"})
    assert pool.acquire("b") is True
    assert pool.status().available_count == 0
    with pytest.raises(
        AgentPoolExhaustedError, match=r"FR10: agent pool exhausted: 2 active \+ 1 requested > 2"
    ):
        pool.acquire("c")
    assert pool.release("a") is True
    assert pool.release("a") is False
    assert pool.status() == PoolStatus(active_count=1, available_count=1, max_concurrent=2)
    assert pool.limiter.borrowed_tokens == 1
    with pytest.raises(InvalidRequestError):
        pool.acquire("")
    with pytest.raises(InvalidRequestError):
        pool.acquire(7)  # type: ignore[arg-type,unused-ignore]


def test_try_acquire_batch_is_all_or_nothing() -> None:
    pool = AgentPool(5)
    assert pool.try_acquire_batch(["a", "b"]) == (True, None)
    ok, reason = pool.try_acquire_batch(["c", "d", "e", "f"])
    assert ok is False and reason is not None and "2 active + 4 requested > 5" in reason
    ok, reason = pool.try_acquire_batch(["c", "b"])
    assert ok is False and reason is not None and "'b'" in reason
    assert pool.active_agents == {"a", "b"}
    # duplicates inside the batch count once
    assert pool.try_acquire_batch(["c", "c", "d"]) == (True, None)
    assert pool.active_count == 4
    assert pool.release_batch(["a", "c", "zz"]) == 2
    assert pool.reset() == 2
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0
    with pytest.raises(InvalidRequestError):
        pool.try_acquire_batch("abc")


async def test_limiter_bounds_tasks_outside_the_pool_too() -> None:
    """Tokens borrowed directly from the limiter count against the pool."""
    pool = AgentPool(2)
    async with pool.limiter:
        assert pool.available_count == 1
        assert pool.try_acquire_batch(["a", "b"])[0] is False
        assert pool.acquire("a")
        assert pool.is_exhausted


async def test_stale_release_after_reset_is_ignored(autojump_clock: trio.testing.MockClock) -> None:
    pool = AgentPool(1)
    async with pool.admit(["a"], queue=True) as admission:
        slot = await admission.take_slot("a")
        pool.reset()
        assert pool.acquire("a")  # a new holder of the id
        admission.release(slot)  # the old holder finishing must not free the new one
    assert pool.is_active("a") and pool.limiter.borrowed_tokens == 1


async def test_admission_reject_mode_is_all_or_nothing_and_returns_everything() -> None:
    pool = AgentPool(3)
    assert pool.acquire("x")
    with pytest.raises(AgentPoolExhaustedError, match=r"FR10: .* 1 active \+ 3 requested > 3"):
        pool.admit(["a", "b", "c"])
    with pytest.raises(AgentBusyError, match="FR10"):
        pool.admit(["a", "x"])
    assert pool.active_agents == {"x"}
    async with pool.admit(["a", "b"]) as admission:
        assert [s.agent_id for s in admission.slots] == ["a", "b"]
        assert pool.active_agents == {"x", "a", "b"} and pool.is_exhausted
        admission.release(admission.slots[0])
        admission.release(admission.slots[0])  # a second release is a no-op
        assert pool.active_agents == {"x", "b"}
    assert pool.active_agents == {"x"} and pool.limiter.borrowed_tokens == 1


async def test_admission_queue_mode_claims_and_gives_back_on_exit() -> None:
    pool = AgentPool(1)
    async with pool.admit(["a", "b"], queue=True) as admission:
        assert pool.queued_agents == {"a", "b"}
        assert pool.acquire("a") is False  # claimed counts as busy
        slot = await admission.take_slot("a")
        assert pool.active_agents == {"a"} and pool.queued_agents == {"b"}
        del slot  # never released by hand: leaving the block gives it back
    assert pool.active_count == 0 and pool.queued_agents == frozenset()
    assert pool.limiter.borrowed_tokens == 0


async def test_statistics_is_a_frozen_snapshot_of_slots_claims_and_waiters() -> None:
    pool = AgentPool(2)
    assert pool.statistics() == PoolStatistics(
        max_concurrent=2,
        active_count=0,
        hedge_calls=0,
        available_count=2,
        queued_count=0,
        tasks_waiting=0,
        leases=0,
    )
    async with pool.admit(["a", "b", "c"], queue=True) as admission:
        await admission.take_slot("a")
        extra = await admission.take_extra_slot("a")  # a hedge call of an active agent
        assert extra is not None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(admission.take_slot, "b")
            await trio.testing.wait_all_tasks_blocked()
            stats = pool.statistics()
            assert (stats.active_count, stats.hedge_calls, stats.available_count) == (1, 1, 0)
            assert (stats.queued_count, stats.tasks_waiting) == (2, 1)
            # The properties read the same state the snapshot does.
            assert stats.active_count == pool.active_count
            assert stats.available_count == pool.available_count
            admission.release(extra)
        assert pool.statistics().active_count == 2
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        stats.active_count = 0  # type: ignore[misc]
    assert pool.statistics().available_count == 2


class PoolMachine(RuleBasedStateMachine):
    """AgentPool against a model: a set of active ids and a capacity."""

    ids = st.sampled_from([f"a{i}" for i in range(12)])

    def __init__(self) -> None:
        super().__init__()
        self.capacity = 5
        self.pool = AgentPool(self.capacity)
        self.model: set[str] = set()

    @rule(agent_id=ids)
    def acquire(self, agent_id: str) -> None:
        if agent_id in self.model:
            assert self.pool.acquire(agent_id) is False
        elif len(self.model) >= self.capacity:
            with pytest.raises(AgentPoolExhaustedError):
                self.pool.acquire(agent_id)
        else:
            assert self.pool.acquire(agent_id) is True
            self.model.add(agent_id)

    @rule(agent_id=ids)
    def release(self, agent_id: str) -> None:
        assert self.pool.release(agent_id) is (agent_id in self.model)
        self.model.discard(agent_id)

    @rule(batch=st.lists(ids, max_size=7))
    def try_acquire_batch(self, batch: list[str]) -> None:
        distinct = set(batch)
        expected = not (distinct & self.model) and len(self.model) + len(distinct) <= self.capacity
        ok, reason = self.pool.try_acquire_batch(batch)
        assert ok is expected
        assert (reason is None) is expected
        if ok:
            self.model |= distinct

    @rule(batch=st.lists(ids, max_size=7))
    def release_batch(self, batch: list[str]) -> None:
        expected = len(set(batch) & self.model)
        assert self.pool.release_batch(batch) == expected
        self.model -= set(batch)

    @precondition(lambda self: len(self.model) > 3)
    @rule()
    def reset(self) -> None:
        assert self.pool.reset() == len(self.model)
        self.model.clear()

    @invariant()
    def matches_model(self) -> None:
        assert self.pool.active_agents == self.model
        assert self.pool.active_count == len(self.model)
        assert self.pool.available_count == self.capacity - len(self.model)
        assert self.pool.limiter.borrowed_tokens == len(self.model)
        assert self.pool.is_exhausted is (len(self.model) == self.capacity)
        for agent_id in self.model:
            assert self.pool.is_active(agent_id)


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


# ---------------------------------------- with a shared capacity (FR10 across processes)


def test_the_model_is_a_shared_capacity_and_bad_ones_are_refused() -> None:
    assert isinstance(ModelCapacity(3), SharedCapacity)
    assert isinstance(ModelCapacity(3), LeaseLossNotifier)
    with pytest.raises(InvalidRequestError, match="SharedCapacity"):
        AgentPool(5, shared=object())  # type: ignore[arg-type]


async def test_reject_mode_is_all_or_nothing_across_pools(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(5)
    first, second = AgentPool(5, shared=shared), AgentPool(5, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    one = ConcurrentDeliberationService(orch, pool=first)
    two = ConcurrentDeliberationService(orch, pool=second)
    result: list[object] = []

    async def run_first() -> None:
        result.append(await one.invoke_concurrent(make_requests(3, prefix="a")))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_first)
        await trio.testing.wait_all_tasks_blocked()
        assert first.status().as_dict() == {
            "active_count": 3,
            "available_count": 2,
            "max_concurrent": 5,
            "shared_capacity": 5,
            "shared_in_use": 3,
        }
        # Locally the second pool is empty; the cluster has 2 left: 3 are refused whole.
        with pytest.raises(AgentPoolExhaustedError, match="shared capacity exhausted"):
            await two.invoke_concurrent(make_requests(3, prefix="b"))
        assert second.active_count == 0 and second.available_count == 5
        assert len(shared.held) == 3
        assert [a for a in orch.invoked if a.startswith("b")] == []
        assert two.metrics.snapshot().pool_exhaustion_errors == 1
    assert shared.held == set() and shared.max_held == 3


async def test_queue_mode_drains_everything_fifo_within_the_shared_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(4)
    pools = [AgentPool(72, shared=shared) for _ in range(3)]
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    results = []

    async def run(i: int) -> None:
        service = ConcurrentDeliberationService(orch, pool=pools[i])
        results.append(
            await service.invoke_concurrent(make_requests(6, prefix=f"p{i}"), overflow="queue")
        )

    async with trio.open_nursery() as nursery:
        for i in range(3):
            nursery.start_soon(run, i)
    assert [r.success_count for r in results] == [6, 6, 6]
    assert orch.max_in_flight == 4 and shared.max_held == 4
    assert shared.held == set() and not shared.waiting
    assert all(p.active_count == 0 and p.available_count == 72 for p in pools)


async def test_an_unreachable_shared_capacity_refuses_admission_and_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(72)
    shared.down = True
    pool = AgentPool(shared=shared)
    orch = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orch, pool=pool)
    for overflow in ("reject", "queue"):
        with pytest.raises(AgentPoolExhaustedError, match="unreachable"):
            await service.invoke_concurrent(make_requests(3), overflow=overflow)
        assert pool.active_count == 0 and pool.available_count == 72
        assert not pool.queued_agents
    assert orch.invoked == []
    assert pool.status().shared_in_use is None


async def test_sync_admission_is_refused_on_a_shared_pool() -> None:
    pool = AgentPool(shared=ModelCapacity(72))
    with pytest.raises(InvalidRequestError, match=r"async with pool\.admit"):
        pool.acquire("a")
    with pytest.raises(InvalidRequestError, match=r"async with pool\.admit"):
        pool.try_acquire_batch(["a", "b"])
    assert pool.active_count == 0


async def test_a_halt_while_queued_for_the_cluster_gives_everything_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(2)
    switch = HaltSwitch()
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, switch, pool)

    async def trigger() -> None:
        await trio.sleep(1.0)
        assert len(shared.waiting) == 1  # the feeder waits for the cluster, FIFO
        switch.halt("stop")

    exc = await expect_halt(
        lambda: service.invoke_concurrent(make_requests(5), overflow="queue"), trigger
    )
    assert exc.partial is not None and exc.partial.total_count == 5
    assert shared.held == set() and not shared.waiting
    assert pool.active_count == 0 and pool.available_count == 72 and not pool.queued_agents


async def test_hedges_take_a_shared_lease_or_none(autojump_clock: trio.testing.MockClock) -> None:
    shared = ModelCapacity(3)
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    result = await service.invoke_concurrent(
        make_requests(2), hedge=HedgePolicy(delay=1.0, budget=1.0)
    )
    # Locally there is room for 70 more calls; the cluster has one: one hedge.
    assert len(result.hedged_agents) == 1 and shared.max_held == 3
    assert shared.held == set() and pool.available_count == 72


async def test_a_shared_capacity_lost_mid_batch_fails_the_unstarted_and_keeps_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(2)
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, pool=pool)

    async def lose_the_server() -> None:
        await trio.sleep(1.5)  # two agents done, two running, the fifth queued for a lease
        shared.down = True

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lose_the_server)
        result = await service.invoke_concurrent(make_requests(6), overflow="queue")
    # The fifth was already waiting in the queue and got its lease; the sixth asks a server
    # that is gone.
    assert result.success_count == 5 and result.total_count == 6
    assert [f.agent_id for f in result.failures] == ["archon-6"]
    assert all(
        "unreachable" in f.message and f.message.startswith("not started") for f in result.failures
    )
    assert pool.active_count == 0 and pool.available_count == 72 and not pool.queued_agents


async def test_a_lost_lease_stops_its_agent_with_an_error_and_the_rest_run_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(3)
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)

    async def lose_one() -> None:
        await trio.sleep(1.0)
        assert len(shared.listeners) == 1  # the pool listens while it holds leases
        shared.lose(shared.taken[1])  # archon-2's (reject mode takes them in order)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lose_one)
        result = await service.invoke_concurrent(make_requests(3))
    # Exactly one outcome each: the agent on the lost lease stopped at once, with the reason.
    assert result.total_count == 3 and result.success_count == 2
    [failure] = result.failures
    assert failure.agent_id == "archon-2" and failure.kind is FailureKind.ERROR
    assert failure.message == "shared capacity lease lost: not renewed within lease_s"
    assert failure.elapsed_ms == pytest.approx(1000.0)
    assert orch.cancelled == ["archon-2"]
    assert pool.active_count == 0 and pool.available_count == 72 and shared.held == set()
    assert shared.listeners == []  # and stops listening once it holds none


async def test_a_lost_lease_before_its_agent_starts_fails_it_not_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(3)
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    requests = make_requests(2)
    async with pool.admit([r.agent_id for r in requests]) as admission:
        assert admission.slots[0].lease is not None
        shared.lose(admission.slots[0].lease)
        assert admission.slots[0].lost == "not renewed within lease_s"
    # The service's own path: the agent on a lease lost before it starts is never invoked.

    class LosingFirst(ModelCapacity):
        async def reserve(self, leases: Sequence[str]) -> None:
            await super().reserve(leases)
            self.lose(leases[0])

    losing = LosingFirst(3)
    service = ConcurrentDeliberationService(orch, pool=AgentPool(72, shared=losing))
    result = await service.invoke_concurrent(requests)
    assert result.success_count == 1 and orch.invoked == ["archon-2"]
    [failure] = result.failures
    assert failure.message == "not started: shared capacity lease lost: not renewed within lease_s"
    assert losing.held == set() and losing.listeners == []


async def test_a_hedge_whose_lease_is_lost_is_dropped_and_the_first_call_stands(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(3)
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)

    async def lose_the_hedge() -> None:
        await trio.sleep(2.0)  # the hedge started at 1.0
        assert len(shared.taken) == 2
        shared.lose(shared.taken[1])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lose_the_hedge)
        result = await service.invoke_concurrent(
            make_requests(1), hedge=HedgePolicy(delay=1.0, budget=1.0)
        )
    assert result.success_count == 1 and result.outputs[0].agent_id == "archon-1"
    assert result.total_ms == pytest.approx(10_000.0)  # the first call's own answer
    assert shared.held == set() and pool.available_count == 72 and shared.listeners == []


# ---------------------------------------- batch admission (a BatchAcquirer)


async def test_queue_mode_asks_for_the_free_slots_leases_in_one_call_and_the_rest_one_by_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = BatchModelCapacity(72)
    assert isinstance(shared, BatchAcquirer) and not isinstance(ModelCapacity(3), BatchAcquirer)
    pool = AgentPool(4, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    result = await service.invoke_concurrent(make_requests(6), overflow="queue")
    assert result.success_count == 6 and orch.max_in_flight == 4
    # Four free local slots: their leases in one call; the last two waited for a local
    # slot, then took their leases one by one.
    assert shared.batch_calls == 1 and len(shared.taken) == 6
    assert orch.invoked == [f"archon-{i}" for i in range(1, 7)]
    assert shared.held == set() and not shared.waiting and not shared.batched
    assert pool.active_count == 0 and pool.available_count == 4 and not pool.queued_agents


async def test_a_batch_partly_granted_starts_the_rest_fifo_as_the_cluster_frees_slots(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = BatchModelCapacity(2)
    pools = [AgentPool(72, shared=shared) for _ in range(2)]
    # One slot frees at a time, so the order of the grants is the order of the starts.
    orch = ScriptedOrchestrator({"p0-2": Step(latency=1.5)}, default=Step(latency=1.0))
    results = []

    async def run(i: int) -> None:
        service = ConcurrentDeliberationService(orch, pool=pools[i])
        requests = make_requests(3, prefix=f"p{i}")
        results.append(await service.invoke_concurrent(requests, overflow="queue"))

    async with trio.open_nursery() as nursery:
        for i in range(2):
            nursery.start_soon(run, i)
            await trio.testing.wait_all_tasks_blocked()
    assert [r.success_count for r in results] == [3, 3]
    assert orch.max_in_flight == 2 and shared.max_held == 2 and shared.batch_calls == 2
    # The second batch queued whole behind the first one's waiter.
    assert orch.invoked == ["p0-1", "p0-2", "p0-3", "p1-1", "p1-2", "p1-3"]
    assert shared.held == set() and not shared.waiting and not shared.batched


async def test_a_halt_while_a_batch_waits_for_the_cluster_gives_everything_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = BatchModelCapacity(2)
    switch = HaltSwitch()
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, switch, pool)

    async def trigger() -> None:
        await trio.sleep(1.0)
        assert len(shared.waiting) == 3  # the batch's other three queued in the same call
        switch.halt("stop")

    exc = await expect_halt(
        lambda: service.invoke_concurrent(make_requests(5), overflow="queue"), trigger
    )
    assert exc.partial is not None and exc.partial.total_count == 5
    assert orch.invoked == ["archon-1", "archon-2"]
    assert shared.held == set() and not shared.waiting and not shared.batched
    assert pool.active_count == 0 and pool.available_count == 72 and not pool.queued_agents


async def test_an_unreachable_batch_capacity_refuses_the_batch_and_takes_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = BatchModelCapacity(72)
    shared.down = True
    pool = AgentPool(shared=shared)
    orch = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orch, pool=pool)
    with pytest.raises(AgentPoolExhaustedError, match="unreachable"):
        await service.invoke_concurrent(make_requests(3), overflow="queue")
    assert orch.invoked == [] and shared.held == set() and not shared.waiting
    assert pool.active_count == 0 and pool.available_count == 72 and not pool.queued_agents


async def test_a_lease_lost_between_its_batch_grant_and_its_start_fails_it_not_started(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class LosingFirst(BatchModelCapacity):
        async def acquire_batch(self, leases: Sequence[str]) -> None:
            await super().acquire_batch(leases)
            self.lose(leases[0])

    shared = LosingFirst(3)
    pool = AgentPool(72, shared=shared)
    orch = ScriptedOrchestrator(default=Step(latency=1.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    result = await service.invoke_concurrent(make_requests(2), overflow="queue")
    assert result.success_count == 1 and orch.invoked == ["archon-2"]
    [failure] = result.failures
    assert failure.message == "not started: shared capacity lease lost: not renewed within lease_s"
    assert shared.held == set() and shared.listeners == [] and not shared.batched
