"""The CLI on a Valkey (or Redis) server: ``--valkey URL`` for ``deliberate`` (the halt
channel every replica obeys, and with ``--shared-capacity N`` the cluster-wide FR10
capacity) and for ``halt``, ``clear`` and ``status``.

adapters.valkey (and coredis) is imported only when ``--valkey`` is given.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from adapters._cli_backend import halt_checker, importing_extra
from adapters._cli_display import plain
from kernel import AgentPool, DualChannelHaltChecker, HaltChecker, HaltSwitch

if TYPE_CHECKING:
    from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel

__all__ = [
    "ValkeyCluster",
    "clear_command",
    "halt_command",
    "open_cluster",
    "status_command",
]

EXIT_OK, EXIT_HALTED = 0, 3


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


async def halt_command(args: argparse.Namespace) -> int:
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyHaltChannel
    async with ValkeyHaltChannel(args.valkey) as channel:
        if await channel.halt(args.reason):
            print(f"halted: {plain(args.reason)}")
            if channel.kept_aside is not None:
                print(f"the unreadable halt key was kept as {channel.kept_aside}")
        else:
            print(f"already halted: {plain(channel.state.reason or '')}")
    return EXIT_OK


async def clear_command(args: argparse.Namespace) -> int:
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyHaltChannel
    async with ValkeyHaltChannel(args.valkey) as channel:
        cleared = await channel.clear(approvers=args.approver, reason=args.reason)
    print("cleared" if cleared else "not halted; nothing to clear")
    return EXIT_OK


async def status_command(args: argparse.Namespace) -> int:
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyHaltChannel, ValkeyUnavailableError
    async with ValkeyHaltChannel(args.valkey) as channel:
        state = channel.state
        try:
            history = await channel.history()
        except ValkeyUnavailableError:
            history = ()
    if not state.halted:
        print("not halted")
    else:
        print(f"HALTED: {plain(state.reason or '')}")
        if state.problem == "no halt record":
            print(
                "  two approvers clear it: conclave clear --valkey URL "
                "--approver A --approver B --reason TEXT"
            )
        elif state.connected and state.problem is not None:
            print("  `conclave halt --valkey` rewrites it as a readable halt; then clear it")
    for record in history[-5:]:
        who = f" by {plain(', '.join(record.approvers))}" if record.approvers else ""
        print(f"  {record.at.isoformat()} {record.action}{who}: {plain(record.reason)}")
    return EXIT_HALTED if state.halted else EXIT_OK
