"""The CLI's shared provider budget: ``--rpm/--tpm`` with ``--valkey URL`` pace every
replica on that server together (``--replicas N``: each one's share while the server is
unreachable), and ``conclave status --valkey URL``'s cluster section.

adapters.valkey (and coredis) is imported only when ``--valkey`` is given.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from adapters.cli._backend import UsageError, importing_extra
from adapters.cli._valkey import DEFAULT_KEY_PREFIX, ValkeySettings

if TYPE_CHECKING:
    from adapters.valkey import ValkeyProviderBudget

__all__ = ["check_budget_usage", "cluster_status", "open_budget", "summary_line"]


def check_budget_usage(args: argparse.Namespace) -> None:
    """Refuse ``--replicas`` where it means nothing; warn when a shared budget has none."""
    limited = bool(args.rpm or args.tpm)
    if args.replicas is not None and not (args.valkey and limited):
        raise UsageError("--replicas needs --valkey URL and --rpm or --tpm (a shared budget)")
    if args.valkey and limited and args.replicas is None:
        print(
            "conclave: warning: --rpm/--tpm with --valkey and no --replicas: should the "
            "server be unreachable, this replica alone would pace at the full limits "
            "(give --replicas N to pace each at 1/N of them)",
            file=sys.stderr,
            flush=True,
        )


@asynccontextmanager
async def open_budget(args: argparse.Namespace) -> AsyncIterator[ValkeyProviderBudget | None]:
    """The shared budget for the duration of the block, when ``--valkey`` and ``--rpm``
    or ``--tpm`` are given (else None).  An unreachable server does not stop the run:
    the budget falls back to this replica's share (and says so)."""
    if not (args.valkey and (args.rpm or args.tpm)):
        yield None
        return
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyProviderBudget

    settings = ValkeySettings.from_args(args)
    assert settings is not None  # --valkey is given
    # --valkey-key-prefix: the budget's keys live beside the halt's and the capacity's.
    async with ValkeyProviderBudget(
        settings.url, key_prefix=settings.key_prefix, replicas=args.replicas or 1
    ) as budget:
        yield budget
        await budget.flush()


def summary_line(shared: object) -> str | None:
    """One line for the run's summary about the shared budget (None without one)."""
    if shared is None:
        return None
    from adapters.valkey import ValkeyProviderBudget

    if not isinstance(shared, ValkeyProviderBudget):
        return None
    budget = shared
    if budget.outages == 0:
        return f"shared budget on {budget.url}: shared by every replica"
    return (
        f"shared budget on {budget.url}: unreachable {budget.outages} time(s), "
        f"{budget.fallback_total_s():.1f} s at this replica's share "
        f"(1/{budget.replicas} of the limits)" + ("" if budget.available else "; still unreachable")
    )


async def cluster_status(url: str, key_prefix: str = DEFAULT_KEY_PREFIX) -> list[str]:
    """The cluster section of ``conclave status --valkey URL``: the shared capacity's
    in-flight count and queue, and every shared budget's lanes."""
    with importing_extra("valkey", "--valkey"):
        from adapters.valkey import ValkeyProviderBudget

    async with ValkeyProviderBudget(url, key_prefix=key_prefix) as budget:
        if not budget.available:
            return [f"cluster: unreachable ({budget.problem})"]
        in_flight, queued = await budget.capacity_counts()
        lanes = await budget.lanes()
    lines = [f"cluster: {in_flight} agent(s) in flight, {queued} queued"]
    if not lanes:
        lines.append("  no shared provider budget in use")
    for lane in lanes:
        rpm = "-" if lane.requests_per_minute is None else str(lane.requests_per_minute)
        tpm = "-" if lane.tokens_per_minute is None else str(lane.tokens_per_minute)
        line = (
            f"  budget {lane.budget[:12]}: {rpm} requests/min, {tpm} tokens/min, "
            f"next free turn in {lane.next_turn_ms:.0f} ms, {lane.turns} turns handed out"
        )
        if lane.paused_ms:
            line += f", paused {lane.paused_ms:.0f} ms more (HTTP 429)"
        lines.append(line)
    return lines
