"""The CLI on a Valkey (or Redis) server: ``--valkey URL`` for ``deliberate`` (the halt
channel every replica obeys, and with ``--shared-capacity N`` the cluster-wide FR10
capacity).  ``halt``, ``clear`` and ``status`` are ``_cli_halt``'s, for every channel.

adapters.valkey (and coredis) is imported only when ``--valkey`` is given.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.cli._backend import halt_checker, importing_extra
from kernel import AgentPool, DualChannelHaltChecker, HaltChecker, HaltSwitch

if TYPE_CHECKING:
    from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel

__all__ = ["ValkeyCluster", "open_cluster"]


class ValkeyCluster:
    """What a run shares with other processes: the Valkey halt channel and the shared
    capacity, each None when not asked for."""

    def __init__(
        self, channel: ValkeyHaltChannel | None = None, capacity: ValkeyCapacity | None = None
    ) -> None:
        self.channel = channel
        self.capacity = capacity

    def pool(self, max_concurrent: int) -> AgentPool:
        """This process's pool; with a shared capacity, admitted against it too."""
        return AgentPool(max_concurrent, shared=self.capacity)

    async def settle(self) -> None:
        """Before a run is reported: the shared capacity's releases sent, its count fresh."""
        if self.capacity is not None:
            await self.capacity.flush()

    def halt_checker(self, switch: HaltSwitch, halt_file: Path | None) -> HaltChecker:
        """The run's halt: the switch (and ``halt_file``), and the Valkey channel: any halts."""
        local = halt_checker(switch, halt_file)
        if self.channel is None:
            return local
        return DualChannelHaltChecker(local, self.channel)


@asynccontextmanager
async def open_cluster(
    url: str | None, shared_capacity: int | None
) -> AsyncIterator[ValkeyCluster]:
    """Connect the halt channel (and the shared capacity) for the duration of the block;
    without ``url``, nothing."""
    if url is None:
        yield ValkeyCluster()
        return
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
    async with AsyncExitStack() as stack:
        channel = await stack.enter_async_context(ValkeyHaltChannel(url))
        capacity = None
        if shared_capacity is not None:
            capacity = await stack.enter_async_context(
                ValkeyCapacity(url, capacity=shared_capacity)
            )
        yield ValkeyCluster(channel, capacity)
