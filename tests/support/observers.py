"""A kernel observer that keeps every event, and the rules any service's events obey."""

from __future__ import annotations

from collections import Counter
from typing import Any, TypeVar

from kernel import (
    ConcurrentResult,
    KernelEvent,
)
from kernel.events import (
    AgentEnded,
    AgentStarted,
    BatchEnded,
    BatchStarted,
    HedgeEnded,
    HedgeStarted,
)

E = TypeVar("E")


class Recorder:
    """Keeps every event a service delivers, in order."""

    def __init__(self) -> None:
        self.events: list[KernelEvent] = []

    def observe(self, event: KernelEvent) -> None:
        self.events.append(event)

    def of(self, kind: type[E]) -> list[E]:
        return [e for e in self.events if isinstance(e, kind)]


def outcome_of(result: ConcurrentResult, agent_id: str) -> str:
    """An agent's outcome in a result as events name it: "ok" or the failure kind."""
    if any(o.agent_id == agent_id for o in result.outputs):
        return "ok"
    return next(f.kind.value for f in result.failures if f.agent_id == agent_id)


def assert_events_agree_with(events: list[Any], result: ConcurrentResult) -> None:
    """One batch's events: it starts once and ends last with its result; every started
    agent ends exactly once, with its outcome in the result; every hedge that starts
    ends, one per hedged agent."""
    assert isinstance(events[0], BatchStarted) and events[0].batch_id == result.batch_id
    assert isinstance(events[-1], BatchEnded) and events[-1].result is result
    started = Counter(e.agent_id for e in events if isinstance(e, AgentStarted))
    ended = Counter(e.agent_id for e in events if isinstance(e, AgentEnded))
    assert started == ended and set(started.values()) <= {1}
    for event in events:
        if isinstance(event, AgentEnded):
            assert event.outcome == outcome_of(result, event.agent_id), event
    hedges = Counter(e.agent_id for e in events if isinstance(e, HedgeStarted))
    assert hedges == Counter(e.agent_id for e in events if isinstance(e, HedgeEnded))
    assert sorted(hedges) == sorted(result.hedged_agents)
