"""The ports: what the kernel recognises a part by (runtime-checkable protocols)."""

from __future__ import annotations

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentOrchestratorProtocol,
    HaltChecker,
    HaltNotifier,
    HaltProbe,
    HaltSwitch,
    HaltWaiter,
    OutputWitness,
)


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
