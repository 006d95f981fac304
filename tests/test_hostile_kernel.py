"""The kernel's promises when parts misbehave (issue 9, items 2-5 and async on_progress).

Every part here is hostile on purpose: an orchestrator that leaks a ``trio.Cancelled``,
swallows its cancellation, returns late or returns garbage; a halt channel that never
answers; a witness that never finishes a commit.  All on trio's virtual clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from uuid import uuid4

import pytest
import trio
import trio.testing

from kernel import (
    AgentInvocationError,
    AgentOutput,
    AgentPool,
    CommitReceipt,
    ConcurrentDeliberationService,
    ContextBundle,
    DualChannelHaltChecker,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.helpers import expect_halt, make_requests


def _output(agent_id: str) -> AgentOutput:
    return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"{agent_id} answers")


class LeakyCancel:
    """Agent ``bad`` raises a ``trio.Cancelled`` nobody asked for; the others answer."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.sleep(0.1)
        if agent_id == "archon-2":
            raise trio.Cancelled._create()
        return _output(agent_id)


class SwallowsCancel:
    """Swallows its cancellation and returns an output anyway."""

    def __init__(self, latency: float = 10.0) -> None:
        self.latency = latency

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        try:
            await trio.sleep(self.latency)
        except trio.Cancelled:  # the misbehaviour under test
            return _output(agent_id)
        return _output(agent_id)


class Instant:
    """Answers without a checkpoint: every agent finishes in the same scheduler pass."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        return _output(agent_id)


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


class InstantWitness(SlowWitness):
    """Commits at once, without a checkpoint."""

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        self.log.append(output)
        return CommitReceipt(
            output.output_id, output.content_hash, len(self.log), "h", output.generated_at
        )


# ---------------------------------------------------------------- item 2: stray cancellation


async def test_a_leaked_trio_cancelled_is_that_agents_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(LeakyCancel(), HaltSwitch())
    result = await service.invoke_concurrent(make_requests(5))
    assert result.total_count == 5 and result.success_count == 4
    (failure,) = result.failures
    assert failure.agent_id == "archon-2" and failure.kind is FailureKind.ERROR
    assert failure.error_type == "Cancelled" and "no halt, timeout or caller" in failure.message
    assert service.get_pool_status().active_count == 0


async def test_invoke_single_with_a_leaked_cancel_raises_invocation_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(LeakyCancel())
    with pytest.raises(AgentInvocationError) as info:
        await service.invoke_single(make_requests(2)[1])
    assert info.value.failure is not None and info.value.failure.kind is FailureKind.ERROR


async def test_a_leaked_cancel_under_a_timeout_is_still_an_error_not_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(LeakyCancel(), agent_timeout=5.0)
    result = await service.invoke_concurrent(make_requests(3))
    assert [f.kind for f in result.failures] == [FailureKind.ERROR]


async def test_real_cancellations_keep_their_meaning(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The caller's cancel scope propagates; a halt is HALTED; a timeout is TIMEOUT."""
    witness = SlowWitness(latency=math.inf)
    service = ConcurrentDeliberationService(Instant(), witness=witness)
    with trio.move_on_after(1.0) as scope:
        await service.invoke_concurrent(make_requests(3))
    assert scope.cancelled_caught and service.active_count == 0 and witness.log == []
    timed = ConcurrentDeliberationService(LeakyCancel(), agent_timeout=0.05)
    result = await timed.invoke_concurrent(make_requests(3))
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}


# ---------------------------------------------------------------- item 5: nothing after a halt


async def test_output_returned_after_the_halt_is_halted_not_released(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    witness = SlowWitness(latency=0.0)
    service = ConcurrentDeliberationService(SwallowsCancel(), switch, witness=witness)

    async def trigger() -> None:
        await trio.sleep(1.0)
        switch.halt("operator stop")

    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(4)), trigger)
    assert exc.partial is not None and exc.partial.success_count == 0
    assert {f.kind for f in exc.partial.failures} == {FailureKind.HALTED}
    assert all("output withheld" in f.message for f in exc.partial.failures)
    assert witness.log == []  # nothing reached the witness either


async def test_instant_agents_and_a_halt_from_on_progress_release_only_what_came_before(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    witness = InstantWitness()
    service = ConcurrentDeliberationService(Instant(), switch, witness=witness)
    reported: list[tuple[str, bool]] = []

    def progress(done: int, total: int, agent_id: str, status: str) -> None:
        reported.append((status, switch.halted))
        if done == 2:
            switch.halt("enough")

    with pytest.raises(SystemHaltedError) as info:
        await service.invoke_concurrent(make_requests(30), on_progress=progress)
    partial = info.value.partial
    assert partial is not None and partial.total_count == 30
    assert partial.success_count == 2
    assert {o.output_id for o in partial.outputs} == {o.output_id for o in witness.log}
    assert ("completed", True) not in reported  # nothing reported as released after it


async def test_output_returned_after_its_timeout_is_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(SwallowsCancel(latency=10.0), agent_timeout=1.0)
    result = await service.invoke_concurrent(make_requests(2))
    assert result.success_count == 0
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}


# ---------------------------------------------------------------- item 4: hanging channels


async def test_a_halt_channel_that_never_answers_counts_as_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = Instant()
    service = ConcurrentDeliberationService(orch, HangingChecker(), halt_read_timeout=0.5)
    t0 = trio.current_time()
    with pytest.raises(SystemHaltedError, match=r"did not answer within 0\.5 s") as info:
        await service.invoke_concurrent(make_requests(3))
    assert info.value.partial is None  # refused before anything ran
    assert trio.current_time() - t0 == pytest.approx(0.5)


async def test_a_channel_that_hangs_mid_batch_halts_it_after_the_read_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(
        SwallowsCancel(latency=60.0),
        HangingChecker(answers=2),
        halt_read_timeout=2.0,
        halt_poll_interval=0.1,
    )
    t0 = trio.current_time()
    with pytest.raises(SystemHaltedError, match="did not answer") as info:
        await service.invoke_concurrent(make_requests(3))
    assert info.value.partial is not None and info.value.partial.success_count == 0
    # the start-of-batch read, one good poll, then one read that times out
    assert trio.current_time() - t0 == pytest.approx(2.1)


async def test_dual_checker_halts_on_either_channel_without_waiting_for_a_hung_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    switch.halt("switch says stop")
    for dual in (
        DualChannelHaltChecker(switch, HangingChecker()),
        DualChannelHaltChecker(HangingChecker(), switch),
    ):
        t0 = trio.current_time()
        assert await dual.get_halt_reason() == "switch says stop"
        assert trio.current_time() == t0  # not a moment spent on the hung channel


async def test_dual_switch_halt_stops_a_batch_while_the_other_channel_hangs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    dual = DualChannelHaltChecker(switch, HangingChecker(answers=1), read_timeout=30.0)
    service = ConcurrentDeliberationService(SwallowsCancel(latency=60.0), dual)

    async def trigger() -> None:
        await trio.sleep(0.5)
        switch.halt("operator stop")

    t0 = trio.current_time()
    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), trigger)
    assert exc.reason == "operator stop"
    assert trio.current_time() - t0 == pytest.approx(0.5)


async def test_dual_both_clear_is_clear_and_a_hung_channel_is_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert not await DualChannelHaltChecker(HaltSwitch(), HaltSwitch()).is_halted()
    dual = DualChannelHaltChecker(HaltSwitch(), HangingChecker(), read_timeout=1.0)
    assert (
        await dual.get_halt_reason() == "halt channel did not answer within 1 s; treated as halted"
    )


def test_halt_read_timeout_is_validated() -> None:
    for bad in (0, -1.0, math.nan, "2", True):
        with pytest.raises(InvalidRequestError, match="halt_read_timeout"):
            ConcurrentDeliberationService(Instant(), halt_read_timeout=bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- item 3: a stuck witness


async def test_a_witness_that_never_commits_does_not_delay_a_halt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    witness = SlowWitness(latency=math.inf)
    service = ConcurrentDeliberationService(Instant(), switch, witness=witness)

    async def trigger() -> None:
        await trio.sleep(0.5)
        switch.halt("stop during commits")

    t0 = trio.current_time()
    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), trigger)
    assert trio.current_time() - t0 == pytest.approx(0.5)
    assert exc.partial is not None and exc.partial.success_count == 0
    assert all(f.kind is FailureKind.HALTED for f in exc.partial.failures)
    assert witness.log == []


async def test_result_and_witness_agree_when_a_halt_lands_during_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    witness = SlowWitness(latency=0.0)

    class Staggered:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            await trio.sleep(int(agent_id.split("-")[1]) * 0.01)
            return _output(agent_id)

    class StaggeredWitness(SlowWitness):
        async def commit(self, output: AgentOutput) -> CommitReceipt:
            self.latency = 0.015
            return await super().commit(output)

    witness = StaggeredWitness()
    service = ConcurrentDeliberationService(Staggered(), switch, witness=witness)

    async def trigger() -> None:
        await trio.sleep(0.3005)
        switch.halt("mid-commit")

    exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), trigger)
    assert exc.partial is not None
    released = {o.output_id for o in exc.partial.outputs}
    assert released == {o.output_id for o in witness.log}
    assert 0 < len(released) < 72


# ---------------------------------------------------------------- on_progress forms


async def test_async_on_progress_is_awaited_and_its_errors_ignored(
    autojump_clock: trio.testing.MockClock,
) -> None:
    seen: list[str] = []

    async def progress(done: int, total: int, agent_id: str, status: str) -> None:
        await trio.sleep(0.01)
        seen.append(agent_id)
        if agent_id == "archon-1":
            raise RuntimeError("display broke")

    service = ConcurrentDeliberationService(Instant())
    result = await service.invoke_concurrent(make_requests(3), on_progress=progress)
    assert result.success_count == 3 and sorted(seen) == ["archon-1", "archon-2", "archon-3"]


@pytest.mark.parametrize("bad", [42, "print", object()])
async def test_non_callable_on_progress_is_refused_before_anything_runs(bad: object) -> None:
    orch = SwallowsCancel(latency=0.0)
    pool = AgentPool()
    service = ConcurrentDeliberationService(orch, pool=pool)
    with pytest.raises(InvalidRequestError, match="on_progress"):
        await service.invoke_concurrent(make_requests(2), on_progress=bad)  # type: ignore[arg-type]
    assert pool.active_count == 0 and service.metrics.snapshot().agent_invocations_total == 0


async def test_on_progress_is_not_called_for_outputs_withheld_by_a_halt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    service = ConcurrentDeliberationService(SwallowsCancel(latency=5.0), switch)
    calls: list[Callable[[], None]] = []

    async def trigger() -> None:
        await trio.sleep(1.0)
        switch.halt("stop")

    exc = await expect_halt(
        lambda: service.invoke_concurrent(
            make_requests(5), on_progress=lambda *a: calls.append(lambda: None)
        ),
        trigger,
    )
    assert exc.partial is not None and calls == []


# ---------------------------------------------------------------- synchronous halt listeners


def test_switch_calls_listeners_inside_halt_and_survives_a_broken_one() -> None:
    switch = HaltSwitch()
    heard: list[str] = []

    def broken(reason: str) -> None:
        raise RuntimeError("listener broke")

    switch.on_halt(broken)
    unregister = switch.on_halt(heard.append)
    assert switch.halt("now") and heard == ["now"]
    switch.clear(approvers=["a", "b"], reason="resume")
    unregister()
    unregister()  # twice is harmless
    switch.halt("again")
    assert heard == ["now"]


def test_dual_checker_forwards_listeners_to_every_channel_that_has_them() -> None:
    first, second = HaltSwitch(), HaltSwitch()
    dual = DualChannelHaltChecker(first, HangingChecker())
    heard: list[str] = []
    unregister = dual.on_halt(heard.append)
    first.halt("one")
    unregister()
    second.halt("not listened to")
    assert heard == ["one"]
    both = DualChannelHaltChecker(HaltSwitch(), second)
    assert both.on_halt(heard.append) is not None


async def test_a_commit_finishing_in_the_instant_of_the_halt_is_not_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The batch is cancelled inside halt(): a commit that would complete in the same
    scheduler pass (a compliant witness checks for cancellation) writes nothing."""
    switch = HaltSwitch()

    class Compliant(InstantWitness):
        async def commit(self, output: AgentOutput) -> CommitReceipt:
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint_if_cancelled()
            return await super().commit(output)

    witness = Compliant()
    service = ConcurrentDeliberationService(Instant(), switch, witness=witness)

    def progress(done: int, total: int, agent_id: str, status: str) -> None:
        switch.halt("first answer is enough")

    with pytest.raises(SystemHaltedError) as info:
        await service.invoke_concurrent(make_requests(10), on_progress=progress)
    assert info.value.partial is not None and info.value.partial.success_count == 1
    assert len(witness.log) == 1
