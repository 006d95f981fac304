"""DualChannelHaltChecker: halted if either channel says so; fail-safe on errors."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from kernel import (
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltChecker,
    HaltRecord,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import (
    GarbageChannel,
    HangingChecker,
    RaisingProbe,
    SwallowsCancel,
    assert_pool_clean,
    raised_with_halt_at,
)


class Channel:
    """A polled channel (no wait_halted) that can be halted, healthy, or broken."""

    def __init__(self, state: str = "ok", reason: str = "channel halt") -> None:
        self.state = state  # ok | halted | broken
        self.reason = reason

    async def is_halted(self) -> bool:
        if self.state == "broken":
            raise OSError("channel down")
        return self.state == "halted"

    async def get_halt_reason(self) -> str | None:
        if self.state == "broken":
            raise OSError("channel down")
        return self.reason if self.state == "halted" else None


class HaltableChannel(Channel):
    """A polled channel that is also a HaltControl."""

    async def ahalt(self, reason: str) -> bool:
        self.state, self.reason = "halted", reason
        return True

    async def aclear(self, *, approvers: Collection[str], reason: str) -> bool:
        raise AssertionError("a conflict is never resolved by clearing")

    async def ahistory(self) -> tuple[HaltRecord, ...]:
        return ()


class SyncHaltOnly(Channel):
    """Has a ``halt`` method, but is no HaltControl: not guessed at."""

    def halt(self, reason: str) -> bool:
        raise AssertionError("resolve_conflict halts a channel through HaltControl only")


STATES = ["ok", "halted", "broken"]


@given(st.sampled_from(STATES), st.sampled_from(STATES))
def test_channel_state_table(primary_state: str, secondary_state: str) -> None:
    primary = Channel(primary_state, "primary reason")
    secondary = Channel(secondary_state, "secondary reason")
    dual = DualChannelHaltChecker(primary, secondary)

    async def main() -> tuple[bool, str | None]:
        return await dual.is_halted(), await dual.get_halt_reason()

    halted, reason = trio.run(main)
    states = {primary_state, secondary_state}
    assert halted is ("halted" in states or states == {"broken"})
    if primary_state == "halted":
        assert reason == "primary reason"
    elif secondary_state == "halted":
        assert reason == "secondary reason"
    elif states == {"broken"}:
        assert reason is not None and "unreadable" in reason
    else:
        assert reason is None
    assert dual.read_errors["primary"] == (2 if primary_state == "broken" else 0)
    assert dual.read_errors["secondary"] == (2 if secondary_state == "broken" else 0)


async def test_wait_halted_returns_when_either_halts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    polled = Channel()
    dual = DualChannelHaltChecker(switch, polled, poll_interval=0.1)
    assert isinstance(dual, HaltChecker)
    got: list[tuple[str, float]] = []

    async def waiter() -> None:
        got.append((await dual.wait_halted(), trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(2.05)
        polled.state = "halted"
    ((reason, at),) = got
    assert reason == "channel halt"
    assert at == pytest.approx(2.1)

    got.clear()
    polled.state = "ok"
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(1)
        switch.halt("switch")
    assert got == [("switch", t0 + 1.0)]


async def test_wait_halted_survives_one_broken_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    broken, switch = Channel("broken"), HaltSwitch()
    dual = DualChannelHaltChecker(broken, switch)
    async with trio.open_nursery() as nursery:
        with trio.move_on_after(1) as scope:
            await dual.wait_halted()
        nursery.cancel_scope.cancel()
    assert scope.cancelled_caught  # the healthy channel decides: not halted
    assert dual.read_errors["primary"] == 1
    both = DualChannelHaltChecker(Channel("broken"), Channel("broken"))
    assert "unreadable" in await both.wait_halted()


async def test_consistency_and_conflict_resolution() -> None:
    switch = HaltSwitch()
    lagging = HaltableChannel()
    dual = DualChannelHaltChecker(switch, lagging)
    assert await dual.check_channels_consistent()
    switch.halt("primary says stop")
    assert not await dual.check_channels_consistent()
    assert await dual.resolve_conflict()
    assert lagging.state == "halted" and "primary says stop" in lagging.reason
    assert await dual.check_channels_consistent()

    # a lagging channel that cannot be halted stays as it is
    dual2 = DualChannelHaltChecker(Channel(), Channel("halted"))
    assert not await dual2.resolve_conflict()
    assert not await DualChannelHaltChecker(SyncHaltOnly(), Channel("halted")).resolve_conflict()
    assert not await DualChannelHaltChecker(Channel("broken"), Channel()).resolve_conflict()


def test_rejects_non_channels() -> None:
    with pytest.raises(InvalidRequestError, match="primary"):
        DualChannelHaltChecker(object(), HaltSwitch())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="poll_interval"):
        DualChannelHaltChecker(HaltSwitch(), HaltSwitch(), poll_interval=0)


async def test_service_halts_on_the_secondary_channel(
    autojump_clock: trio.testing.MockClock,
) -> None:
    secondary = Channel()
    dual = DualChannelHaltChecker(HaltSwitch(), secondary, poll_interval=0.05)
    orch = ScriptedOrchestrator(default=Step(latency=600))
    service = ConcurrentDeliberationService(orch, dual)

    async def flip() -> None:
        await trio.sleep(1)
        secondary.state = "halted"

    err = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), flip)
    assert err.reason == "channel halt"
    assert err.partial is not None and err.partial.failure_count == 72
    assert trio.current_time() <= 1.05 + 1e-9


async def test_a_halted_channel_with_a_reason_that_is_not_text_still_halts_a_dual_checker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: the dual checker only counted ``str`` reasons as halted, so a channel saying
    halted with ``b"maintenance"`` read as clear: the batch started and its agents ran."""
    garbage: Any = GarbageChannel(True, b"maintenance")
    dual = DualChannelHaltChecker(HaltSwitch(), garbage)
    assert await dual.is_halted()
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, dual)
    with pytest.raises(SystemHaltedError) as caught:
        await service.invoke_concurrent(make_requests(3))
    assert caught.value.partial is None and orchestrator.invoked == []
    assert isinstance(caught.value.reason, str) and caught.value.reason.strip()


async def test_a_dual_checker_lets_the_reads_decide_when_one_channels_probe_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: the probe's ``OSError`` escaped the batch.  In a dual checker a channel that
    raises lets the other decide, so a broken probe is "not known", and the reads (both
    clear here) decide; the switch still halts the batch at once."""
    switch = HaltSwitch()
    dual = DualChannelHaltChecker(switch, RaisingProbe())
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, dual)
    result = await service.invoke_concurrent(make_requests(3))
    assert result.success_count == 3
    assert dual.read_errors["secondary"] > 0

    call = service.invoke_concurrent(make_requests(3, prefix="b"))
    raised = await raised_with_halt_at(0.5, switch, call)
    assert isinstance(raised, SystemHaltedError) and raised.reason == "operator"
    assert_pool_clean(service)


async def test_dual_checker_halts_on_either_channel_without_waiting_for_a_hung_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    switch.halt("switch says stop")
    for dual in (
        DualChannelHaltChecker(switch, HangingChecker()),
        DualChannelHaltChecker(HangingChecker(), switch),
    ):
        t0 = trio.current_time()
        assert await dual.get_halt_reason() == "switch says stop"
        assert trio.current_time() == t0  # not a moment spent on the hung channel


async def test_dual_switch_halt_stops_a_batch_while_the_other_channel_hangs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    dual = DualChannelHaltChecker(switch, HangingChecker(answers=1), read_timeout=30.0)
    service = ConcurrentDeliberationService(SwallowsCancel(latency=60.0), dual)

    async def trigger() -> None:
        await trio.sleep(0.5)
        switch.halt("operator stop")

    t0 = trio.current_time()
    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), trigger)
    assert exc.reason == "operator stop"
    assert trio.current_time() - t0 == pytest.approx(0.5)


async def test_dual_both_clear_is_clear_and_a_hung_channel_is_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert not await DualChannelHaltChecker(HaltSwitch(), HaltSwitch()).is_halted()
    dual = DualChannelHaltChecker(HaltSwitch(), HangingChecker(), read_timeout=1.0)
    assert (
        await dual.get_halt_reason() == "halt channel did not answer within 1 s; treated as halted"
    )


def test_dual_checker_forwards_listeners_to_every_channel_that_has_them() -> None:
    first, second = HaltSwitch(), HaltSwitch()
    dual = DualChannelHaltChecker(first, HangingChecker())
    heard: list[str] = []
    unregister = dual.on_halt(heard.append)
    first.halt("one")
    unregister()
    second.halt("not listened to")
    assert heard == ["one"]
    both = DualChannelHaltChecker(HaltSwitch(), second)
    assert both.on_halt(heard.append) is not None
