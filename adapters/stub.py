"""A trio-native development orchestrator: deterministic, configurable, observable."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from uuid import uuid4

import trio

from kernel import (
    AgentInvocationError,
    AgentOutput,
    AgentRequest,
    AgentStatus,
    AgentStatusInfo,
    ContextBundle,
    InvalidRequestError,
    utc_now,
)
from kernel.validate import check_number, check_text

__all__ = ["AgentOrchestratorStub"]


def _check_ms(value: object, name: str) -> float:
    return check_number(value, name, at_least=0, finite=False)


def _check_ids(agent_ids: Iterable[str]) -> set[str]:
    if isinstance(agent_ids, str):
        raise InvalidRequestError("fail_agents must be a collection of agent ids, not a string")
    return {check_text(a, "agent id") for a in agent_ids}


class AgentOrchestratorStub:
    """Answers every agent after ``latency_ms`` (plus up to ``jitter_ms``) of trio sleep.

    Content starts with ``"[DEV MODE] "`` and names the agent and the topic.  Agents in
    the fail set raise :class:`AgentInvocationError` after their latency.  Jitter is
    uniform in ``[0, jitter_ms]`` from a ``random.Random(seed)``, so a seeded stub
    produces the same latencies in the same invocation order.

    For tests and benchmarks it tracks invocation counts, what is in flight now,
    :attr:`max_in_flight`, and :attr:`start_times` (trio clock, per invocation).
    """

    def __init__(
        self,
        latency_ms: float = 1.0,
        fail_agents: Iterable[str] = (),
        *,
        jitter_ms: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self._latency_ms = _check_ms(latency_ms, "latency_ms")
        self._jitter_ms = _check_ms(jitter_ms, "jitter_ms")
        self._fail_agents = _check_ids(fail_agents)
        self._rng = random.Random(seed)
        self._counts: Counter[str] = Counter()
        self._busy: set[str] = set()
        self._failed: dict[str, str] = {}
        self._last: dict[str, datetime] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.start_times: list[float] = []

    def __repr__(self) -> str:
        return f"<AgentOrchestratorStub latency_ms={self._latency_ms} jitter_ms={self._jitter_ms}>"

    # ------------------------------------------------------------ configuration

    @property
    def latency_ms(self) -> float:
        return self._latency_ms

    @property
    def fail_agents(self) -> frozenset[str]:
        return frozenset(self._fail_agents)

    def set_latency(self, latency_ms: float, jitter_ms: float | None = None) -> None:
        self._latency_ms = _check_ms(latency_ms, "latency_ms")
        if jitter_ms is not None:
            self._jitter_ms = _check_ms(jitter_ms, "jitter_ms")

    def set_fail_agents(self, agent_ids: Iterable[str]) -> None:
        self._fail_agents = _check_ids(agent_ids)

    def add_fail_agent(self, agent_id: str) -> None:
        self._fail_agents |= _check_ids([agent_id])

    def remove_fail_agent(self, agent_id: str) -> None:
        self._fail_agents.discard(agent_id)

    # ------------------------------------------------------------ statistics

    def get_invocation_count(self, agent_id: str | None = None) -> int:
        """Invocations started, for one agent or (``None``) in total."""
        if agent_id is None:
            return sum(self._counts.values())
        return self._counts[agent_id]

    def reset_stats(self) -> None:
        self._counts.clear()
        self._failed.clear()
        self._last.clear()
        self.max_in_flight = self.in_flight
        self.start_times.clear()

    def get_agent_status(self, agent_id: str) -> AgentStatusInfo:
        """BUSY while invoked, FAILED if its last try failed, IDLE, or UNKNOWN if never seen."""
        if agent_id in self._busy:
            status = AgentStatus.BUSY
        elif agent_id in self._failed:
            status = AgentStatus.FAILED
        elif agent_id in self._last:
            status = AgentStatus.IDLE
        else:
            status = AgentStatus.UNKNOWN
        return AgentStatusInfo(
            agent_id=agent_id,
            status=status,
            last_invocation=self._last.get(agent_id),
            last_error=self._failed.get(agent_id),
        )

    # ------------------------------------------------------------ orchestration

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self._counts[agent_id] += 1
        self._last[agent_id] = utc_now()
        self.start_times.append(trio.current_time())
        self._busy.add(agent_id)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay_ms = self._latency_ms
            if self._jitter_ms:
                delay_ms += self._rng.uniform(0.0, self._jitter_ms)
            if delay_ms:
                await trio.sleep(delay_ms / 1000.0)
            else:
                await trio.lowlevel.checkpoint()
            if agent_id in self._fail_agents:
                message = f"[DEV MODE] simulated failure of agent {agent_id}"
                self._failed[agent_id] = message
                raise AgentInvocationError(message)
            self._failed.pop(agent_id, None)
            return AgentOutput(
                agent_id=agent_id,
                request_id=uuid4(),
                content=(
                    f"[DEV MODE] {agent_id} on topic {context.topic_id}: "
                    f"deliberated in {delay_ms:.1f} ms."
                ),
                metadata={"stub": 1, "latency_ms": round(delay_ms, 3)},
            )
        finally:
            self.in_flight -= 1
            self._busy.discard(agent_id)

    async def invoke_batch(self, requests: Sequence[AgentRequest]) -> list[AgentOutput]:
        """Invoke every request concurrently (no pool, no halt): outputs in request order.

        If any agent fails, the first failure in request order is raised once all
        have finished.
        """
        results: list[AgentOutput | BaseException | None] = [None] * len(requests)

        async def one(i: int, req: AgentRequest) -> None:
            try:
                results[i] = await self.invoke(req.agent_id, req.context)
            except Exception as exc:
                results[i] = exc

        async with trio.open_nursery() as nursery:
            for i, req in enumerate(requests):
                nursery.start_soon(one, i, req)
        outputs: list[AgentOutput] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            assert r is not None
            outputs.append(r)
        return outputs

    async def invoke_sequential(self, requests: Sequence[AgentRequest]) -> list[AgentOutput]:
        """Invoke the requests one after another; the first failure is raised at once."""
        return [await self.invoke(r.agent_id, r.context) for r in requests]
