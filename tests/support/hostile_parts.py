"""Hostile parts shared by the kernel tests: orchestrators, channels and witnesses that
misbehave, and the checks every such test ends with."""

from __future__ import annotations

import math
from collections.abc import Awaitable
from uuid import uuid4

import trio
import trio.testing

from kernel import (
    AgentOutput,
    CommitReceipt,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
)

#: A valid Python int (and JSON number) that no float can hold.
HUGE = 10**400


def output_of(agent_id: str) -> AgentOutput:
    return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"{agent_id} answers")


class ClearChannel:
    """A polled halt channel that is never halted; the ones below break one more part."""

    async def is_halted(self) -> bool:
        return False

    async def get_halt_reason(self) -> str | None:
        return None


class SwallowsCancel:
    """Swallows its cancellation and returns an output anyway."""

    def __init__(self, latency: float = 10.0) -> None:
        self.latency = latency

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        try:
            await trio.sleep(self.latency)
        except trio.Cancelled:  # the misbehaviour under test
            return output_of(agent_id)
        return output_of(agent_id)


class Instant:
    """Answers without a checkpoint: every agent finishes in the same scheduler pass."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        return output_of(agent_id)


class SlowWitness:
    """Commits take ``latency`` seconds; a cancelled commit writes nothing (the contract)."""

    def __init__(self, latency: float = math.inf) -> None:
        self.latency = latency
        self.log: list[AgentOutput] = []

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        await trio.sleep(self.latency)
        self.log.append(output)  # the point of no return: no checkpoint after it
        return CommitReceipt(
            output.output_id, output.content_hash, len(self.log), "h", output.generated_at
        )


class Ledger:
    """A witness whose commits take ``commit_ms``; cancelled before the end, it writes
    nothing.  Unlike :class:`SlowWitness` it asks whether it was cancelled after its sleep:
    a sleep that ended in the same scheduler pass as the cancel does not raise it."""

    def __init__(self, commit_ms: int) -> None:
        self.commit_s = commit_ms / 1000.0
        self.log: list[AgentOutput] = []

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        await trio.sleep(self.commit_s)
        await trio.lowlevel.checkpoint_if_cancelled()
        self.log.append(output)
        return CommitReceipt(
            output.output_id, output.content_hash, len(self.log), "h", output.generated_at
        )


class InstantWitness(SlowWitness):
    """Commits at once, without a checkpoint."""

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        self.log.append(output)
        return CommitReceipt(
            output.output_id, output.content_hash, len(self.log), "h", output.generated_at
        )


class HangingChecker:
    """A halt channel whose reads never return (after ``answers`` good ones)."""

    def __init__(self, answers: int = 0) -> None:
        self.answers = answers

    async def is_halted(self) -> bool:
        if self.answers > 0:
            self.answers -= 1
            return False
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def get_halt_reason(self) -> str | None:
        return None


async def raised_by(call: Awaitable[object]) -> BaseException | None:
    """What ``call`` raised, whatever it was (a stray ``Cancelled`` must not escape a
    test, where the test runner could take it for its own)."""
    try:
        await call
    except BaseException as exc:  # the point: see everything, Cancelled included
        return exc
    return None


async def raised_with_halt_at(
    seconds: float, switch: HaltSwitch, call: Awaitable[object]
) -> BaseException | None:
    """What ``call`` raised (see ``raised_by``), ``switch`` halting ("operator") once
    ``seconds`` have passed."""

    async def halt_later() -> None:
        await trio.sleep(seconds)
        switch.halt("operator")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(halt_later)
        return await raised_by(call)


def assert_pool_clean(service: ConcurrentDeliberationService) -> None:
    pool = service.pool
    assert pool.active_count == 0 and pool.queued_agents == frozenset()
    assert pool.available_count == pool.max_concurrent


class GarbageChannel:
    """A polled halt channel whose answers are not what the protocol says."""

    def __init__(self, halted: object, reason: object = None) -> None:
        self.halted = halted
        self.reason = reason

    async def is_halted(self) -> object:
        return self.halted

    async def get_halt_reason(self) -> object:
        return self.reason


class RaisingProbe(ClearChannel):
    """A clear channel whose synchronous probe raises."""

    def halted_now(self) -> bool:
        raise OSError("probe broke")


async def halt_after(switch: HaltSwitch, delay: float, reason: str = "stop now") -> None:
    await trio.sleep(delay)
    switch.halt(reason)


TEN_MINUTES = 600.0
