"""The kernel's promises when parts misbehave (issue 9, items 2-5 and async on_progress).

Every part here is hostile on purpose: an orchestrator that leaks a ``trio.Cancelled``,
swallows its cancellation, returns late or returns garbage; a halt channel that never
answers; a witness that never finishes a commit.  All on trio's virtual clock.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kernel import (
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltSwitch,
)
from tests.support.helpers import expect_halt, make_requests
from tests.support.hostile_parts import HangingChecker, SwallowsCancel

# ---------------------------------------------------------------- item 2: stray cancellation


# ---------------------------------------------------------------- item 5: nothing after a halt


# ---------------------------------------------------------------- item 4: hanging channels


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


# ---------------------------------------------------------------- item 3: a stuck witness


# ---------------------------------------------------------------- on_progress forms


# ---------------------------------------------------------------- synchronous halt listeners


def test_switch_calls_listeners_inside_halt_and_survives_a_broken_one() -> None:
    switch = HaltSwitch()
    heard: list[str] = []

    def broken(reason: str) -> None:
        raise RuntimeError("listener broke")

    switch.on_halt(broken)
    unregister = switch.on_halt(heard.append)
    assert switch.halt("now") and heard == ["now"]
    switch.clear(approvers=["a", "b"], reason="resume")
    unregister()
    unregister()  # twice is harmless
    switch.halt("again")
    assert heard == ["now"]


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
