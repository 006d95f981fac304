"""The CLI on a Valkey (or Redis) server: ``--valkey URL`` for ``deliberate`` (the halt
channel every replica obeys, and with ``--shared-capacity N`` the cluster-wide FR10
capacity).  ``halt``, ``clear`` and ``status`` are ``_cli_halt``'s, for every channel.

adapters.valkey (and coredis) is imported only when ``--valkey`` is given.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from adapters.cli._backend import UsageError, halt_checker, importing_extra
from kernel import AgentPool, DualChannelHaltChecker, HaltChecker, HaltSwitch

if TYPE_CHECKING:
    from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel

__all__ = [
    "DEFAULT_KEY_PREFIX",
    "ValkeyCluster",
    "ValkeySettings",
    "add_key_prefix_option",
    "add_lease_option",
    "check_usage",
    "open_cluster",
]

DEFAULT_KEY_PREFIX = "conclave"
#: The CLI's bounds on ``--lease``: a dead replica's slots come back within the lease, so
#: more than an hour is taken for a mistake (milliseconds typed as seconds, say); below a
#: tenth of a second the renewals (every third of it) would be most of the traffic.
LEASE_BOUNDS_S = (0.1, 3600.0)
# A prefix's longest suffix is ":waiting:corrupt"; keys stay within the adapters' 200.
_MAX_PREFIX_CHARS = 150


@attrs.frozen(kw_only=True)
class ValkeySettings:
    """How a run shares state through one Valkey server: the server, the namespace of every
    key it uses there (``<key_prefix>:halt``, the capacity's ``<key_prefix>:leases`` ...,
    and whatever else is shared there), the shared capacity's lease length."""

    url: str
    key_prefix: str = DEFAULT_KEY_PREFIX
    lease_s: float = 30.0

    @property
    def halt_key(self) -> str:
        return f"{self.key_prefix}:halt"

    @property
    def capacity_name(self) -> str:
        return self.key_prefix

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ValkeySettings | None:
        """The settings of a command's ``--valkey`` options; None without ``--valkey``."""
        if args.valkey is None:
            return None
        lease = getattr(args, "lease", None)
        return cls(
            url=args.valkey,
            key_prefix=args.valkey_key_prefix,
            lease_s=30.0 if lease is None else lease,
        )


def check_usage(args: argparse.Namespace) -> None:
    """Refuse ``deliberate``'s Valkey options that need one they were not given."""
    if args.shared_capacity is not None and args.valkey is None:
        raise UsageError("--shared-capacity needs --valkey URL (the server that shares it)")
    if args.valkey is None and args.valkey_key_prefix != DEFAULT_KEY_PREFIX:
        raise UsageError("--valkey-key-prefix needs --valkey URL (the server it names keys on)")
    if args.lease is not None and args.shared_capacity is None:
        raise UsageError("--lease is the shared capacity's: it needs --shared-capacity N")


def _key_prefix(text: str) -> str:
    if not text or len(text) > _MAX_PREFIX_CHARS or not text.isprintable() or " " in text:
        raise argparse.ArgumentTypeError(
            f"a key prefix is 1 to {_MAX_PREFIX_CHARS} printable characters without spaces"
        )
    return text


def _lease(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    low, high = LEASE_BOUNDS_S
    if not math.isfinite(value) or not low <= value <= high:
        raise argparse.ArgumentTypeError(f"must be {low:g} to {high:g} seconds, got {text}")
    return value


def add_key_prefix_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--valkey-key-prefix",
        type=_key_prefix,
        default=DEFAULT_KEY_PREFIX,
        metavar="PREFIX",
        help="with --valkey: the namespace of every key on the server (the halt is "
        f"PREFIX:halt; default {DEFAULT_KEY_PREFIX!r}): processes share what shares a prefix",
    )


def add_lease_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    low, high = LEASE_BOUNDS_S
    parser.add_argument(
        "--lease",
        type=_lease,
        default=None,
        metavar="SECONDS",
        help="with --shared-capacity: how long a slot outlives its holder's last renewal "
        f"(a dead process's slots come back after it; {low:g} to {high:g}, default 30)",
    )


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
    settings: ValkeySettings | None, shared_capacity: int | None
) -> AsyncIterator[ValkeyCluster]:
    """Connect the halt channel (and the shared capacity) for the duration of the block;
    without ``settings`` (no ``--valkey``), nothing."""
    if settings is None:
        yield ValkeyCluster()
        return
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
    url = settings.url
    async with AsyncExitStack() as stack:
        channel = await stack.enter_async_context(ValkeyHaltChannel(url, key=settings.halt_key))
        capacity = None
        if shared_capacity is not None:
            capacity = await stack.enter_async_context(
                ValkeyCapacity(
                    url,
                    name=settings.capacity_name,
                    capacity=shared_capacity,
                    lease_s=settings.lease_s,
                )
            )
        yield ValkeyCluster(channel, capacity)
