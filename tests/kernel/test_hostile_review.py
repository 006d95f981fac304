"""A hostile review of the kernel's promises (issues 9-11): each test is a defect found by
attacking them, shown failing before its fix.  All on trio's virtual clock."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import uuid4

import pytest
import trio
import trio.testing

from kernel import (
    AgentOutput,
    ConcurrentDeliberationService,
    ContextBundle,
    DualChannelHaltChecker,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    SystemHaltedError,
)
from kernel.validate import check_number, check_seconds
from tests.support.helpers import ScriptedOrchestrator, Step, make_requests
from tests.support.hostile_parts import (
    GarbageChannel,
    RaisingProbe,
    assert_pool_clean,
    raised_with_halt_at,
)

# ---------------------------------------------------------------- garbage from a halt channel


async def test_a_halted_channel_with_a_reason_that_is_not_text_still_halts_a_dual_checker(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: the dual checker only counted ``str`` reasons as halted, so a channel saying
    halted with ``b"maintenance"`` read as clear: the batch started and its agents ran."""
    garbage: Any = GarbageChannel(True, b"maintenance")
    dual = DualChannelHaltChecker(HaltSwitch(), garbage)
    assert await dual.is_halted()
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, dual)
    with pytest.raises(SystemHaltedError) as caught:
        await service.invoke_concurrent(make_requests(3))
    assert caught.value.partial is None and orchestrator.invoked == []
    assert isinstance(caught.value.reason, str) and caught.value.reason.strip()


# ---------------------------------------------------------------- a stray Cancelled from a channel


# ---------------------------------------------------------------- a channel's sync parts raise


async def test_a_dual_checker_lets_the_reads_decide_when_one_channels_probe_raises(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: the probe's ``OSError`` escaped the batch.  In a dual checker a channel that
    raises lets the other decide, so a broken probe is "not known", and the reads (both
    clear here) decide; the switch still halts the batch at once."""
    switch = HaltSwitch()
    dual = DualChannelHaltChecker(switch, RaisingProbe())
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, dual)
    result = await service.invoke_concurrent(make_requests(3))
    assert result.success_count == 3
    assert dual.read_errors["secondary"] > 0

    call = service.invoke_concurrent(make_requests(3, prefix="b"))
    raised = await raised_with_halt_at(0.5, switch, call)
    assert isinstance(raised, SystemHaltedError) and raised.reason == "operator"
    assert_pool_clean(service)


# ---------------------------------------------------------------- a cancel turned into an error


# ---------------------------------------------------------------- hedging metrics


class HedgeAnswersInTheSameRound:
    """Each agent's first call answers at t=10 and, just before returning, releases its
    hedge, which then answers without another checkpoint: both calls finish in the same
    scheduling round, the first call first."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}
        self.first_done: dict[str, trio.Event] = {}

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        call = self.calls.get(agent_id, 0)
        self.calls[agent_id] = call + 1
        done = self.first_done.setdefault(agent_id, trio.Event())
        if call == 0:
            await trio.sleep(10.0)
            done.set()
        else:
            await done.wait()
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"call {call}")


async def test_hedges_won_counts_only_hedges_whose_answer_is_the_agents(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: a hedge that answered in the same round as the first call, after it, was
    counted as won although the first call's output was the one released."""
    service = ConcurrentDeliberationService(HedgeAnswersInTheSameRound())
    hedge = HedgePolicy(delay=5.0, budget=1.0)
    result = await service.invoke_concurrent(make_requests(3), hedge=hedge)
    assert [o.content for o in result.outputs] == ["call 0"] * 3
    assert len(result.hedged_agents) == 3
    snapshot = service.metrics.snapshot()
    assert snapshot.hedges_launched == 3
    assert snapshot.hedges_won == 0


# ---------------------------------------------------------------- numbers too large for a float

HUGE = 10**400  # a valid Python int (and JSON number) that no float can hold


@pytest.mark.parametrize(
    "build",
    [
        lambda: check_number(HUGE, "x"),
        lambda: check_seconds(HUGE, "x"),
        lambda: HedgePolicy(delay=HUGE),
        lambda: HedgePolicy(budget=HUGE),
        lambda: HedgePolicy(quantile=-HUGE),
        lambda: ConcurrentDeliberationService(ScriptedOrchestrator(), agent_timeout=HUGE),
        lambda: ConcurrentDeliberationService(ScriptedOrchestrator(), halt_read_timeout=HUGE),
        lambda: ConcurrentDeliberationService(ScriptedOrchestrator(), deadline=HUGE),
        lambda: DualChannelHaltChecker(HaltSwitch(), HaltSwitch(), read_timeout=HUGE),
    ],
)
def test_an_int_too_large_for_a_float_is_invalid_input(build: Callable[[], object]) -> None:
    """Was: ``OverflowError: int too large to convert to float`` out of every check."""
    with pytest.raises(InvalidRequestError, match="too large"):
        build()


@pytest.mark.parametrize(
    ("tail", "name"),
    [
        ({"deadline": HUGE}, "deadline"),
        ({"quorum": 10**5000}, "quorum"),  # past Python's int-to-text limit
        ({"quorum": -(10**5000)}, "quorum"),
        ({"agent_timeout": -(10**5000)}, "agent_timeout"),
    ],
)
async def test_huge_ints_for_a_batch_are_refused_before_anything_runs(
    autojump_clock: trio.testing.MockClock, tail: dict[str, Any], name: str
) -> None:
    """Was: ``OverflowError``, or ``ValueError: Exceeds the limit (4300 digits) for
    integer string conversion`` from formatting the error message itself."""
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator)
    with pytest.raises(InvalidRequestError, match=name):
        await service.invoke_concurrent(make_requests(2), **tail)
    assert orchestrator.invoked == []
    assert_pool_clean(service)


# ---------------------------------------------------------------- on_progress that never runs


# ---------------------------------------------------------------- halted, but no reason to be had
