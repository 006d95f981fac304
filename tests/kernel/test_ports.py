"""The ports: what the kernel recognises a part by (runtime-checkable protocols), and
their contracts, run against every implementation the project ships.

HaltControl: the in-process switch, the file channel and the Valkey channel (on the real
server of tests/support/valkey_server.py) raise, clear and tell their history alike.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import pytest
import trio

from adapters.halt.file import FileHaltChannel
from adapters.stub import AgentOrchestratorStub
from adapters.valkey import ValkeyHaltChannel
from kernel import (
    AgentOrchestratorProtocol,
    HaltChecker,
    HaltClearDeniedError,
    HaltControl,
    HaltNotifier,
    HaltProbe,
    HaltRecord,
    HaltSwitch,
    HaltWaiter,
    InvalidRequestError,
    OutputWitness,
)
from tests.support.valkey_server import ValkeyServer

Control = HaltControl  # every channel below is also a HaltChecker
Opener = Callable[[], AbstractAsyncContextManager[HaltControl]]


@pytest.fixture(params=["switch", "file", "valkey"])
def open_control(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """Opens a fresh, cleared channel of each kind."""
    kind = request.param

    @asynccontextmanager
    async def opened() -> AsyncIterator[HaltControl]:
        if kind == "switch":
            yield HaltSwitch()
        elif kind == "file":
            yield FileHaltChannel(tmp_path / "halt.json")
        else:
            server: ValkeyServer = request.getfixturevalue("valkey_server")
            key = f"test:{uuid.uuid4().hex}:halt"
            async with ValkeyHaltChannel(server.url, key=key) as channel:
                # A new key reads halted (no record) until two approvers clear it once.
                assert await channel.aclear(approvers=["ops", "sre"], reason="first start")
                with trio.fail_after(5):
                    await channel.wait_cleared()
                yield channel

    return opened


async def _reason(control: HaltControl) -> str | None:
    assert isinstance(control, HaltChecker)
    return await control.get_halt_reason()


async def _seen_cleared(control: HaltControl) -> None:
    """A clear is read at once, except by a Valkey channel, which lifts its halt only
    once the server's message comes (taking it locally could hide a halt raised
    elsewhere in between)."""
    if isinstance(control, ValkeyHaltChannel):
        with trio.fail_after(5):
            await control.wait_cleared()
    assert await _reason(control) is None


async def test_every_channel_is_a_halt_control(open_control: Opener) -> None:
    async with open_control() as control:
        assert isinstance(control, HaltControl)
        assert isinstance(control, HaltChecker)


async def test_the_first_halt_changes_the_state_and_its_reason_is_kept(
    open_control: Opener,
) -> None:
    async with open_control() as control:
        assert await _reason(control) is None
        assert await control.ahalt("storm warning") is True
        assert await control.ahalt("second reason") is False
        assert await _reason(control) == "storm warning"


async def test_a_clear_needs_two_approvers_and_says_whether_it_cleared(
    open_control: Opener,
) -> None:
    async with open_control() as control:
        await control.ahalt("audit")
        before = await control.ahistory()
        for approvers in (["alice"], ["alice", " alice "], []):
            with pytest.raises(HaltClearDeniedError):
                await control.aclear(approvers=approvers, reason="fixed")
        with pytest.raises(HaltClearDeniedError):
            await control.aclear(approvers=["alice", "bob"], reason=" ")
        assert await _reason(control) == "audit"  # refusals changed nothing
        assert await control.ahistory() == before
        assert await control.aclear(approvers=["bob", "alice"], reason="fixed") is True
        await _seen_cleared(control)
        assert await control.aclear(approvers=["alice", "bob"], reason="again") is False
        # After a clear the channel can be halted again.
        assert await control.ahalt("once more") is True


async def test_a_blank_reason_is_refused_and_changes_nothing(open_control: Opener) -> None:
    async with open_control() as control:
        before = await control.ahistory()
        for reason in ("", "   "):
            with pytest.raises(InvalidRequestError, match="non-empty reason"):
                await control.ahalt(reason)
        assert await _reason(control) is None
        assert await control.ahistory() == before


async def test_the_history_records_each_halt_and_clear_oldest_first(
    open_control: Opener,
) -> None:
    async with open_control() as control:
        start = len(await control.ahistory())
        await control.ahalt("first")
        await control.ahalt("ignored: already halted")
        await control.aclear(approvers=["bob", "alice"], reason="fixed")
        await control.aclear(approvers=["bob", "alice"], reason="nothing to clear")
        await control.ahalt("second")
        history = (await control.ahistory())[start:]
        assert all(isinstance(r, HaltRecord) for r in history)
        assert [(r.action, r.reason, r.approvers) for r in history] == [
            ("halt", "first", ()),
            ("clear", "fixed", ("alice", "bob")),
            ("halt", "second", ()),
        ]
        assert all(r.at.tzinfo is not None for r in history)
        assert history[0].at <= history[1].at <= history[2].at


class _ReadOnlyChannel:
    async def is_halted(self) -> bool:
        return False

    async def get_halt_reason(self) -> str | None:
        return None


def test_a_part_is_recognised_by_what_it_can_do() -> None:
    switch = HaltSwitch()
    for port in (HaltChecker, HaltProbe, HaltNotifier, HaltWaiter):
        assert isinstance(switch, port), port
    channel = _ReadOnlyChannel()
    assert isinstance(channel, HaltChecker)
    # A channel that can only be read is polled: no probe, listener or waiter is assumed.
    assert not isinstance(channel, HaltProbe | HaltNotifier | HaltWaiter)
    assert isinstance(AgentOrchestratorStub(), AgentOrchestratorProtocol)
    assert not isinstance(channel, OutputWitness)
