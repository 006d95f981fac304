"""The bridge waits for a cancelled asyncio task to unwind -- but not forever."""

from __future__ import annotations

import asyncio
import time
from uuid import uuid4

import pytest
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from kernel import (
    AgentOutput,
    ConcurrentDeliberationService,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
)
from tests.support.helpers import expect_halt, make_requests


class SlowToUnwind:
    """An asyncio orchestrator whose clean-up, once cancelled, takes ``cleanup_s``."""

    def __init__(self, cleanup_s: float) -> None:
        self.cleanup_s = cleanup_s
        self.unwound = 0

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(self.cleanup_s)  # e.g. flushing a session, politely
            self.unwound += 1
            raise
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="never")


async def test_a_halt_waits_for_slow_clean_up_no_longer_than_the_grace() -> None:
    inner = SlowToUnwind(cleanup_s=3.0)
    switch = HaltSwitch()
    async with AsyncioOrchestratorBridge(inner, unwind_grace_s=0.2) as bridge:
        service = ConcurrentDeliberationService(bridge, switch)
        timing: dict[str, float] = {}

        async def trigger() -> None:
            await trio.sleep(0.1)
            timing["halt"] = time.perf_counter()
            switch.halt("stop")

        exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(5)), trigger)
        took = time.perf_counter() - timing["halt"]
        assert exc.partial is not None
        assert {f.kind for f in exc.partial.failures} == {FailureKind.HALTED}
        assert 0.15 < took < 2.5  # the grace (0.2 s), not the 3 s clean-up
        assert service.pool.available_count == 72


async def test_quick_clean_up_is_waited_for() -> None:
    inner = SlowToUnwind(cleanup_s=0.05)
    switch = HaltSwitch()
    async with AsyncioOrchestratorBridge(inner, unwind_grace_s=5.0) as bridge:
        service = ConcurrentDeliberationService(bridge, switch)

        async def trigger() -> None:
            await trio.sleep(0.1)
            switch.halt("stop")

        await expect_halt(lambda: service.invoke_concurrent(make_requests(3)), trigger)
        assert inner.unwound == 3  # every task had finished unwinding before the return


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_bad_grace_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="unwind_grace_s"):
        AsyncioOrchestratorBridge(SlowToUnwind(0.0), unwind_grace_s=bad)  # type: ignore[arg-type]
