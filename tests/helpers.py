"""Test doubles: a scripted trio orchestrator and request builders."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from uuid import uuid4

import trio

from kernel import AgentOutput, AgentRequest, ContextBundle, SystemHaltedError


def make_context(topic: str = "topic-1") -> ContextBundle:
    return ContextBundle(topic_id=topic, topic_content=f"What should the council do about {topic}?")


def make_requests(
    n: int, context: ContextBundle | None = None, prefix: str = "archon"
) -> list[AgentRequest]:
    ctx = context or make_context()
    return [AgentRequest(agent_id=f"{prefix}-{i + 1}", context=ctx) for i in range(n)]


@dataclass(frozen=True)
class Step:
    """What one scripted agent does: wait ``latency`` seconds, then ``action``."""

    latency: float = 0.0
    action: str = "ok"  # ok | error | invalid | wrong_agent | keyboard_interrupt | forever


class ScriptedOrchestrator:
    """A trio orchestrator whose every agent follows a script; records what happened."""

    def __init__(self, plan: Mapping[str, Step] | None = None, default: Step = Step()) -> None:
        self.plan = dict(plan or {})
        self.default = default
        self.in_flight = 0
        self.max_in_flight = 0
        self.starts: list[tuple[str, float]] = []
        self.finishes: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.on_start: Callable[[str], None] | None = None

    @property
    def invoked(self) -> list[str]:
        return [a for a, _ in self.starts]

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        step = self.plan.get(agent_id, self.default)
        self.starts.append((agent_id, trio.current_time()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.on_start is not None:
            self.on_start(agent_id)
        try:
            if step.action == "forever" or math.isinf(step.latency):
                await trio.sleep_forever()
            await trio.sleep(step.latency)
            self.finishes.append((agent_id, trio.current_time()))
            if step.action == "error":
                raise RuntimeError(f"scripted failure of {agent_id}")
            if step.action == "keyboard_interrupt":
                raise KeyboardInterrupt
            if step.action == "invalid":
                return "not an output"  # type: ignore[return-value]
            owner = "someone-else" if step.action == "wrong_agent" else agent_id
            return AgentOutput(
                agent_id=owner,
                request_id=uuid4(),
                content=f"{agent_id} says yes on {context.topic_id}",
            )
        except trio.Cancelled:
            self.cancelled.append(agent_id)
            raise
        finally:
            self.in_flight -= 1


async def expect_halt(
    call: Callable[[], Awaitable[object]], trigger: Callable[[], Awaitable[None]]
) -> SystemHaltedError:
    """Run ``call`` while ``trigger`` runs beside it; return the SystemHaltedError it raised."""
    caught: list[SystemHaltedError] = []

    async def run_call(cancel_scope: trio.CancelScope) -> None:
        try:
            await call()
        except SystemHaltedError as exc:
            caught.append(exc)
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger)
        nursery.start_soon(run_call, nursery.cancel_scope)
    if not caught:
        raise AssertionError("expected SystemHaltedError, the call returned")
    return caught[0]
