"""Reading a halt channel: polled, waited on, probed, listened to; every failure a halt."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from kernel import (
    AgentPool,
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import (
    TEN_MINUTES,
    ClearChannel,
    GarbageChannel,
    HangingChecker,
    Instant,
    RaisingProbe,
    SwallowsCancel,
    assert_pool_clean,
    raised_by,
)


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


async def test_a_halt_channel_that_never_answers_counts_as_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = Instant()
    service = ConcurrentDeliberationService(orch, HangingChecker(), halt_read_timeout=0.5)
    t0 = trio.current_time()
    with pytest.raises(SystemHaltedError, match=r"did not answer within 0\.5 s") as info:
        await service.invoke_concurrent(make_requests(3))
    assert info.value.partial is None  # refused before anything ran
    assert trio.current_time() - t0 == pytest.approx(0.5)


async def test_a_channel_that_hangs_mid_batch_halts_it_after_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(
        SwallowsCancel(latency=60.0),
        HangingChecker(answers=2),
        halt_read_timeout=2.0,
        halt_poll_interval=0.1,
    )
    t0 = trio.current_time()
    with pytest.raises(SystemHaltedError, match="did not answer") as info:
        await service.invoke_concurrent(make_requests(3))
    assert info.value.partial is not None and info.value.partial.success_count == 0
    # the start-of-batch read, one good poll, then one read that times out
    assert trio.current_time() - t0 == pytest.approx(2.1)


def test_halt_read_timeout_is_validated() -> None:
    for bad in (0, -1.0, math.nan, "2", True):
        with pytest.raises(InvalidRequestError, match="halt_read_timeout"):
            ConcurrentDeliberationService(Instant(), halt_read_timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("answer", [None, 0, "", [], 0.0])
async def test_a_channel_whose_is_halted_is_not_a_bool_counts_as_halted(
    autojump_clock: trio.testing.MockClock, answer: object
) -> None:
    """Guards against: a falsy non-bool (a forgotten ``return``: None) read as "not halted"."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    garbage: Any = GarbageChannel(answer)
    service = ConcurrentDeliberationService(orchestrator, garbage)
    with pytest.raises(SystemHaltedError, match="not a bool") as caught:
        await service.invoke_concurrent(make_requests(3))
    assert caught.value.partial is None and orchestrator.invoked == []
    assert_pool_clean(service)


class StrayCancelChannel:
    """A polled halt channel that answers ``good_reads`` times, then raises a
    ``trio.Cancelled`` that no cancel scope asked for."""

    def __init__(self, good_reads: int) -> None:
        self.good_reads = good_reads

    async def is_halted(self) -> bool:
        await trio.sleep(0.01)
        if self.good_reads > 0:
            self.good_reads -= 1
            return False
        raise trio.Cancelled._create()

    async def get_halt_reason(self) -> str | None:
        return None


async def test_a_stray_cancelled_from_the_halt_read_at_batch_start_is_a_halt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: the bare ``trio.Cancelled`` escaped ``invoke_concurrent`` (no outcome, no
    halt), though a channel that raises counts as halted."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, StrayCancelChannel(0))
    raised = await raised_by(service.invoke_concurrent(make_requests(3)))
    assert isinstance(raised, SystemHaltedError), repr(raised)
    assert "halt checker failed" in raised.reason
    assert raised.partial is None and orchestrator.invoked == []
    assert_pool_clean(service)


async def test_a_stray_cancelled_from_the_halt_watcher_halts_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: the watcher's stray Cancelled cancelled every agent and the batch *returned*
    normally, each agent ``CANCELLED`` "not needed: quorum of None reached" (no quorum
    was asked for): a misbehaving halt channel read as a finished batch."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, StrayCancelChannel(1))
    raised = await raised_by(service.invoke_concurrent(make_requests(3)))
    assert isinstance(raised, SystemHaltedError), repr(raised)
    assert "halt checker failed" in raised.reason
    partial = raised.partial
    assert partial is not None and partial.total_count == 3
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    assert_pool_clean(service)


class RaisingNotifier(ClearChannel):
    """A clear channel that cannot register a halt listener."""

    def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        raise OSError("cannot listen")


@pytest.mark.parametrize("channel", [RaisingProbe, RaisingNotifier])
async def test_a_channel_whose_probe_or_listener_raises_halts_instead_of_crashing(
    autojump_clock: trio.testing.MockClock, channel: type
) -> None:
    """Guards against: the ``OSError`` escaped ``invoke_concurrent``, no outcome, no halt; a channel
    that raises counts as halted (CT-11: any doubt is a halt)."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, channel())
    raised = await raised_by(service.invoke_concurrent(make_requests(3)))
    assert isinstance(raised, SystemHaltedError), repr(raised)
    assert "halt checker failed (OSError)" in raised.reason
    assert orchestrator.invoked == []
    partial = raised.partial
    assert partial is not None and partial.total_count == 3
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    assert_pool_clean(service)


class AsyncProbe(ClearChannel):
    """``halted_now`` written as ``async def``: its call is a coroutine, always truthy."""

    async def halted_now(self) -> bool:
        return False


class AsyncNotifier(ClearChannel):
    """``on_halt`` written as ``async def``: it never registers, and its "unregister" is
    a coroutine."""

    async def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None


@pytest.mark.parametrize(
    ("channel", "method"), [(AsyncProbe, "halted_now"), (AsyncNotifier, "on_halt")]
)
def test_a_channel_with_an_async_probe_or_listener_is_refused_when_wired(
    channel: type, method: str
) -> None:
    """Guards against: accepted; an async ``halted_now`` then halted *every* batch with "halted (no
    reason given)" (a coroutine is truthy) and leaked an un-awaited coroutine; an async
    ``on_halt`` never listened.  The protocols say synchronous: refuse it at once."""
    orchestrator = ScriptedOrchestrator()
    with pytest.raises(InvalidRequestError, match=method):
        ConcurrentDeliberationService(orchestrator, channel())
    with pytest.raises(InvalidRequestError, match=method):
        DualChannelHaltChecker(HaltSwitch(), channel())


class HaltedWithoutReason:
    """Says halted; then fails to say why (its reason store is down)."""

    async def is_halted(self) -> bool:
        return True

    async def get_halt_reason(self) -> str | None:
        raise OSError("reason store down")


async def test_a_channel_that_says_halted_but_cannot_say_why_is_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: the failed reason read turned the whole read into a failure, and in a dual
    checker a failed read "lets the other channel decide": the halt was lost, and the
    batch ran to completion."""
    dual = DualChannelHaltChecker(HaltSwitch(), HaltedWithoutReason())
    assert await dual.is_halted()
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, dual)
    with pytest.raises(SystemHaltedError, match="OSError") as caught:
        await service.invoke_concurrent(make_requests(3))
    assert caught.value.partial is None and orchestrator.invoked == []
    with trio.fail_after(1.0):
        assert "OSError" in await dual.wait_halted()
