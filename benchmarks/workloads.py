"""The same job three ways: ``n`` agents that each sleep ``latency_ms``, run ``repeat``
times in a row, through the kernel, a bare trio nursery, or the asyncio reference.

A workload is built outside the event loop and awaited inside it (``benchmarks.timing``);
what a scenario wants to read afterwards (the stub's ``max_in_flight``) is an attribute.
Only the kernel's long-standing public names are used (none of ``kernel.validate`` or
``MetricsSnapshot``), so that ``benchmarks.compare`` can run these against an older kernel.
"""

from __future__ import annotations

import abc

import trio

from adapters.stub import AgentOrchestratorStub
from benchmarks.baselines import bare_trio
from benchmarks.baselines.reference_asyncio import AsyncioStub, ReferenceService
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    HaltSwitch,
    Overflow,
)

__all__ = [
    "BareBatch",
    "KernelBatch",
    "ReferenceBatch",
    "ServiceBatch",
    "Workload",
    "requests_for",
]

CAPACITY = MAX_CONCURRENT_AGENTS


def requests_for(n: int, topic: str = "bench") -> list[AgentRequest]:
    """``n`` requests for agents ``archon-1`` ... ``archon-n`` on one topic."""
    context = ContextBundle(topic_id=topic, topic_content="Should the council adopt the motion?")
    return [AgentRequest(agent_id=f"archon-{i + 1}", context=context) for i in range(n)]


class Workload(abc.ABC):
    """``repeat`` batches of the same ``n`` requests per call, one after another."""

    def __init__(self, n: int, repeat: int) -> None:
        self.requests = requests_for(n)
        self.repeat = repeat

    async def __call__(self) -> None:
        for _ in range(self.repeat):
            await self.run_once()

    @abc.abstractmethod
    async def run_once(self) -> None:
        """One batch of every request; raises if any agent failed."""

    def check(self, result: ConcurrentResult) -> None:
        if result.success_count != len(self.requests):
            raise RuntimeError(f"benchmark batch failed: {result.failures[:1]}")


class ServiceBatch(Workload):
    """``invoke_concurrent`` of ``n`` requests on a given service."""

    def __init__(
        self,
        service: ConcurrentDeliberationService,
        n: int,
        *,
        overflow: Overflow = "reject",
        repeat: int = 1,
    ) -> None:
        super().__init__(n, repeat)
        self.service = service
        self.overflow = overflow

    async def run_once(self) -> None:
        self.check(await self.service.invoke_concurrent(self.requests, overflow=self.overflow))


class KernelBatch(ServiceBatch):
    """A :class:`ServiceBatch` on the stub, with a pool of its own of ``capacity``."""

    def __init__(
        self,
        n: int,
        latency_ms: float,
        *,
        capacity: int = CAPACITY,
        overflow: Overflow = "reject",
        repeat: int = 1,
    ) -> None:
        self.stub = AgentOrchestratorStub(latency_ms=latency_ms)
        service = ConcurrentDeliberationService(self.stub, HaltSwitch(), AgentPool(capacity))
        super().__init__(service, n, overflow=overflow, repeat=repeat)


class BareBatch(Workload):
    """A trio nursery under a ``CapacityLimiter``: the floor (``baselines.bare_trio``)."""

    def __init__(
        self, n: int, latency_ms: float, *, capacity: int = CAPACITY, repeat: int = 1
    ) -> None:
        super().__init__(n, repeat)
        self.stub = AgentOrchestratorStub(latency_ms=latency_ms)
        self.limiter = trio.CapacityLimiter(capacity)

    async def run_once(self) -> None:
        await bare_trio.run_batch(self.stub, self.requests, self.limiter)


class ReferenceBatch(Workload):
    """The asyncio design the kernel replaces (``baselines.reference_asyncio``); with
    ``admit=False`` its semaphore queues instead of its pool refusing."""

    def __init__(
        self,
        n: int,
        latency_ms: float,
        *,
        capacity: int = CAPACITY,
        admit: bool = True,
        repeat: int = 1,
    ) -> None:
        super().__init__(n, repeat)
        self.service = ReferenceService(AsyncioStub(latency_ms), capacity, admit=admit)

    async def run_once(self) -> None:
        self.check(await self.service.invoke_concurrent(self.requests))
