"""Baseline 1: the reference design conclave-kernel replaces.

``asyncio.gather`` of per-agent coroutines under an ``asyncio.Semaphore(72)``, a
set-based pool, and a halt check only at the start of a batch.  It uses the kernel's
own domain types so that the comparison measures concurrency machinery, not data
classes.  It cannot halt a batch in flight: the check happens once, before it starts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from uuid import uuid4

from kernel import (
    AgentFailure,
    AgentOutput,
    AgentPoolExhaustedError,
    AgentRequest,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    SystemHaltedError,
)


class AsyncioStub:
    """The asyncio twin of AgentOrchestratorStub: sleep, then an AgentOutput."""

    def __init__(self, latency_ms: float = 0.0) -> None:
        self.latency_s = latency_ms / 1000.0
        self.in_flight = 0
        self.max_in_flight = 0

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.latency_s)
            return AgentOutput(
                agent_id=agent_id,
                request_id=uuid4(),
                content=f"[DEV MODE] {agent_id} on topic {context.topic_id}",
            )
        finally:
            self.in_flight -= 1


class ReferencePool:
    def __init__(self, max_concurrent: int = 72) -> None:
        self.max_concurrent = max_concurrent
        self.active: set[str] = set()

    def try_acquire_batch(self, ids: Sequence[str]) -> bool:
        if self.active & set(ids) or len(self.active) + len(ids) > self.max_concurrent:
            return False
        self.active |= set(ids)
        return True

    def release_batch(self, ids: Sequence[str]) -> None:
        self.active -= set(ids)


class ReferenceService:
    def __init__(
        self, orchestrator: AsyncioStub, max_concurrent: int = 72, *, admit: bool = True
    ) -> None:
        self.orchestrator = orchestrator
        self.pool = ReferencePool(max_concurrent)
        self.semaphore_size = max_concurrent
        self.admit = admit  # False: skip the pool, let the semaphore queue (queue/scale runs)
        self.halted = False

    async def invoke_concurrent(self, requests: Sequence[AgentRequest]) -> ConcurrentResult:
        if self.halted:  # the only halt check
            raise SystemHaltedError("halted")
        ids = [r.agent_id for r in requests]
        if self.admit and not self.pool.try_acquire_batch(ids):
            raise AgentPoolExhaustedError("FR10: pool exhausted")
        started_at, t0 = datetime.now(UTC), time.perf_counter()
        semaphore = asyncio.Semaphore(self.semaphore_size)
        batch_id = uuid4()

        async def one(req: AgentRequest) -> AgentOutput | AgentFailure:
            async with semaphore:
                s = time.perf_counter()
                try:
                    out = await self.orchestrator.invoke(req.agent_id, req.context)
                except Exception as exc:
                    return AgentFailure(
                        agent_id=req.agent_id,
                        request_id=req.request_id,
                        kind=FailureKind.ERROR,
                        error_type=type(exc).__name__,
                        message=str(exc),
                        elapsed_ms=(time.perf_counter() - s) * 1000,
                    )
                return AgentOutput(
                    agent_id=out.agent_id,
                    request_id=req.request_id,
                    content=out.content,
                    output_id=out.output_id,
                    batch_id=batch_id,
                )

        try:
            outcomes = await asyncio.gather(*(one(r) for r in requests))
        finally:
            if self.admit:
                self.pool.release_batch(ids)
        return ConcurrentResult(
            batch_id=batch_id,
            outputs=[o for o in outcomes if isinstance(o, AgentOutput)],
            failures=[o for o in outcomes if isinstance(o, AgentFailure)],
            started_at=started_at,
            completed_at=datetime.now(UTC),
            total_ms=(time.perf_counter() - t0) * 1000,
        )
