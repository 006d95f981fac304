"""A trio-native development orchestrator: deterministic, configurable, observable."""

from __future__ import annotations

import math
import random
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Literal
from uuid import uuid4

import attrs
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
from kernel.validate import check_number, check_text, number

__all__ = ["STUB_MODEL", "AgentOrchestratorStub", "LatencyModel", "stub_usage"]


@attrs.frozen(slots=True)
class LatencyModel:
    """A heavy-tailed model of one LLM call's latency, for measuring tail control.

    Each call takes a lognormal time (``median_ms``, ``sigma``), and with probability
    ``stall_probability`` it stalls for ``stall_ms`` instead (a provider hiccup: queueing,
    a cold instance, a dropped stream that the client waits out).

    The defaults come from published figures for hosted LLM APIs: a median of ~800 ms with
    a p99 an order of magnitude or more above it (p50 800 ms / p99 28 s in T. Pan, "LLM
    Tail Latency", 2026; p50 620 ms / p95 2.8 s / p99 8.2 s in CostHawk's "P95 / P99
    Latency" glossary, 2026).  Their p95/p50 ratio of ~4.5 gives ``sigma`` = ln(4.5) /
    1.645 = 0.9; stalls of 30 s on 0.5% of calls give the far tail the first source
    reports, beyond what the lognormal body alone produces.  With 72 agents, about 30%
    of batches then contain a stall: the case hedging is for.
    """

    median_ms: float = attrs.field(default=800.0, validator=number(above=0))
    sigma: float = attrs.field(default=0.9, validator=number(at_least=0, at_most=10))
    stall_probability: float = attrs.field(default=0.005, validator=number(at_least=0, at_most=1))
    stall_ms: float = attrs.field(default=30_000.0, validator=number(at_least=0))

    def with_median(self, median_ms: float) -> LatencyModel:
        """The same shape around another median: stalls scale with it."""
        scale = check_number(median_ms, "median_ms", above=0) / self.median_ms
        return attrs.evolve(self, median_ms=median_ms, stall_ms=self.stall_ms * scale)

    def sample_ms(self, rng: random.Random) -> float:
        """One call's latency in milliseconds, drawn from ``rng``."""
        if self.stall_probability and rng.random() < self.stall_probability:
            return self.stall_ms
        return self.median_ms * math.exp(self.sigma * rng.gauss(0.0, 1.0))


#: The model name the stub's answers report.
STUB_MODEL = "stub"


def stub_usage(agent_id: str, context: ContextBundle) -> dict[str, str | int]:
    """Plausible token usage for a stub answer, as an LLM adapter reports it: a prompt of
    a system prompt (~60 tokens) and the topic (UTF-8 bytes / 4), an answer of 150-349
    tokens that depends on the agent only (the stub's random draws stay the latencies')."""
    prompt = 60 + len(context.topic_content.encode("utf-8")) // 4
    completion = 150 + zlib.crc32(agent_id.encode("utf-8")) % 200
    return {
        "model": STUB_MODEL,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "usage": "estimated",
    }


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

    ``latency_profile="lognormal"`` (or a :class:`LatencyModel`) draws every call's
    latency from a heavy-tailed model instead (``latency_ms`` and ``jitter_ms`` are then
    unused); ``time_scale`` multiplies every latency (0.01 runs a 800 ms median in 8 ms,
    for time-scaled benchmarks).

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
        latency_profile: Literal["fixed", "lognormal"] | LatencyModel = "fixed",
        time_scale: float = 1.0,
    ) -> None:
        self._latency_ms = _check_ms(latency_ms, "latency_ms")
        self._jitter_ms = _check_ms(jitter_ms, "jitter_ms")
        if isinstance(latency_profile, LatencyModel):
            self._model: LatencyModel | None = latency_profile
        elif latency_profile == "lognormal":
            self._model = LatencyModel()
        elif latency_profile == "fixed":
            self._model = None
        else:
            raise InvalidRequestError(
                "latency_profile must be 'fixed', 'lognormal' or a LatencyModel, "
                f"got {latency_profile!r}"
            )
        self._time_scale = check_number(time_scale, "time_scale", above=0)
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
        if self._model is not None:
            return f"<AgentOrchestratorStub {self._model!r}>"
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
            if self._model is not None:
                delay_ms = self._model.sample_ms(self._rng) * self._time_scale
            else:
                delay_ms = self._latency_ms
                if self._jitter_ms:
                    delay_ms += self._rng.uniform(0.0, self._jitter_ms)
                delay_ms *= self._time_scale
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
                metadata={
                    "stub": 1,
                    "latency_ms": round(delay_ms, 3),
                    **stub_usage(agent_id, context),
                },
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
