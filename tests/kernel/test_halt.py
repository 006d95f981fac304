from __future__ import annotations

import pytest
import trio
import trio.testing

from kernel import (
    HaltChecker,
    HaltClearDeniedError,
    HaltSwitch,
    HaltWaiter,
    InvalidRequestError,
)


async def test_halt_is_sticky_and_first_reason_wins() -> None:
    switch = HaltSwitch()
    assert isinstance(switch, HaltChecker) and isinstance(switch, HaltWaiter)
    assert not await switch.is_halted()
    assert switch.halt("first") is True
    assert switch.halt("second") is False
    assert switch.halted and switch.reason == "first"
    assert await switch.is_halted()
    assert await switch.get_halt_reason() == "first"
    assert [r.action for r in switch.history] == ["halt"]


async def test_wait_halted_wakes_on_halt(autojump_clock: trio.testing.MockClock) -> None:
    switch = HaltSwitch()
    got: list[tuple[str, float]] = []

    async def waiter() -> None:
        got.append((await switch.wait_halted(), trio.current_time()))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await trio.sleep(3)
        switch.halt("now")
    assert got == [("now", 3.0), ("now", 3.0)]
    assert await switch.wait_halted() == "now"  # returns at once when already halted


@pytest.mark.parametrize(
    "approvers", [[], ["alice"], ["alice", "alice"], ["alice", " "], "alice,bob", ["alice", ""]]
)
def test_clear_needs_two_distinct_approvers(approvers: object) -> None:
    switch = HaltSwitch()
    switch.halt("x")
    with pytest.raises(HaltClearDeniedError, match="CT-11"):
        switch.clear(approvers=approvers, reason="fixed")  # type: ignore[arg-type]
    assert switch.halted and switch.reason == "x"


def test_clear_needs_reason_and_can_be_halted_again() -> None:
    switch = HaltSwitch()
    switch.halt("x")
    with pytest.raises(HaltClearDeniedError, match="reason"):
        switch.clear(approvers=["a", "b"], reason="")
    switch.clear(approvers=["bob", "alice"], reason="fixed")
    assert not switch.halted and switch.reason is None
    assert switch.halt("again") is True
    actions = [(r.action, r.reason, r.approvers) for r in switch.history]
    assert actions == [
        ("halt", "x", ()),
        ("clear", "fixed", ("alice", "bob")),
        ("halt", "again", ()),
    ]


async def test_waiter_survives_clear_and_sees_next_halt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    switch.halt("one")
    switch.clear(approvers=["a", "b"], reason="ok")
    got: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _append(got, switch))
        await trio.sleep(1)
        assert got == []
        switch.halt("two")
    assert got == ["two"]


async def _append(got: list[str], switch: HaltSwitch) -> None:
    got.append(await switch.wait_halted())


def test_halt_needs_a_reason() -> None:
    switch = HaltSwitch()
    with pytest.raises(InvalidRequestError):
        switch.halt("")
    with pytest.raises(InvalidRequestError):
        switch.halt(None)  # type: ignore[arg-type]
    assert not switch.halted


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


async def test_the_switch_takes_approver_names_and_refuses_signed_approvals() -> None:
    switch = HaltSwitch()
    switch.halt("storm")
    with pytest.raises(HaltClearDeniedError, match="names, not signed approvals"):
        await switch.aclear(approvals=["signed", "signed too"], reason="calm")
    assert switch.halted and len(switch.history) == 1
    assert await switch.aclear(approvers=["alice", "bob"], reason="calm") is True
