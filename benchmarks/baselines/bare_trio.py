"""Baseline 2: a bare trio nursery under a CapacityLimiter, no kernel features.

No admission, no halt, no timeouts, no stamping, no outcome classification: the floor
any trio implementation of the same job sits on.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio

from kernel import AgentOrchestratorProtocol, AgentOutput, AgentRequest


async def run_batch(
    orchestrator: AgentOrchestratorProtocol,
    requests: Sequence[AgentRequest],
    limiter: trio.CapacityLimiter,
) -> list[AgentOutput | Exception | None]:
    """Every request's output or exception, in request order."""
    results: list[AgentOutput | Exception | None] = [None] * len(requests)

    async def one(i: int, req: AgentRequest) -> None:
        async with limiter:
            try:
                results[i] = await orchestrator.invoke(req.agent_id, req.context)
            except Exception as exc:
                results[i] = exc

    async with trio.open_nursery() as nursery:
        for i, req in enumerate(requests):
            nursery.start_soon(one, i, req)
    return results
