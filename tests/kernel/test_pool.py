"""AgentPool: atomic admission, the limiter it shares, and a model-based stateful test."""

from __future__ import annotations

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
    InvalidRequestError,
    PoolStatistics,
    PoolStatus,
)


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
