"""One agent call, one outcome: classification, timeouts, stray cancels, the witness."""

from __future__ import annotations

import math
from typing import Any
from uuid import uuid4

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from kernel import (
    RESUMED,
    AgentInvocationError,
    AgentOutput,
    AgentPool,
    CommitReceipt,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    SystemHaltedError,
    utc_now,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import (
    Instant,
    InstantWitness,
    SlowWitness,
    SwallowsCancel,
    output_of,
    raised_with_halt_at,
)


async def test_every_failure_kind_is_classified(autojump_clock: trio.testing.MockClock) -> None:
    plan = {
        "archon-1": Step(latency=1.0),
        "archon-2": Step(latency=1.0, action="error"),
        "archon-3": Step(latency=10.0),
        "archon-4": Step(latency=1.0, action="invalid"),
        "archon-5": Step(latency=1.0, action="wrong_agent"),
    }
    pool = AgentPool()
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan), pool=pool, agent_timeout=5)
    requests = make_requests(5)
    result = await service.invoke_concurrent(requests)
    assert [o.agent_id for o in result.outputs] == ["archon-1"]
    kinds = {f.agent_id: f for f in result.failures}
    assert kinds["archon-2"].kind is FailureKind.ERROR
    assert kinds["archon-2"].error_type == "RuntimeError"
    assert kinds["archon-2"].message == "scripted failure of archon-2"
    assert kinds["archon-3"].kind is FailureKind.TIMEOUT
    assert kinds["archon-3"].elapsed_ms == pytest.approx(5000.0)
    assert "5 s" in kinds["archon-3"].message
    assert kinds["archon-4"].kind is FailureKind.INVALID_OUTPUT
    assert "str" in kinds["archon-4"].message
    assert kinds["archon-5"].kind is FailureKind.INVALID_OUTPUT
    assert "someone-else" in kinds["archon-5"].message
    assert result.failed_agents == ("archon-2", "archon-3", "archon-4", "archon-5")
    assert result.total_ms == pytest.approx(5000.0)
    assert pool.active_count == 0


async def test_per_call_timeout_overrides_service_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=2.0))
    service = ConcurrentDeliberationService(orch, agent_timeout=1.0)
    assert (await service.invoke_concurrent(make_requests(2))).failure_count == 2
    ok = await service.invoke_concurrent(make_requests(2), agent_timeout=3.0)
    assert ok.success_count == 2


async def test_timeout_turned_into_an_exception_is_still_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Converts:
        async def invoke(self, agent_id: str, context: object) -> AgentOutput:
            try:
                await trio.sleep(10)
            except trio.Cancelled:
                raise TimeoutError("client gave up") from None
            raise AssertionError("unreachable")

    service = ConcurrentDeliberationService(Converts(), agent_timeout=1)
    result = await service.invoke_concurrent(make_requests(1))
    assert result.failures[0].kind is FailureKind.TIMEOUT


async def test_outputs_are_stamped_and_content_hashed(
    autojump_clock: trio.testing.MockClock, service: ConcurrentDeliberationService
) -> None:
    requests = make_requests(3)
    result = await service.invoke_concurrent(requests)
    for req, out in zip(requests, result.outputs, strict=True):
        assert out.request_id == req.request_id
        assert out.batch_id == result.batch_id
        assert len(out.content_hash) == 64
    assert result.started_at <= result.completed_at


class GatedWitness:
    def __init__(self) -> None:
        self.gate = trio.Event()
        self.committed: list[AgentOutput] = []
        self.fail_for: set[str] = set()

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        await self.gate.wait()
        if output.agent_id in self.fail_for:
            raise OSError("disk full")
        self.committed.append(output)
        return CommitReceipt(
            output.output_id, output.content_hash, len(self.committed), "x", utc_now()
        )


async def test_witness_holds_outputs_back_until_committed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    witness = GatedWitness()
    witness.fail_for = {"archon-2"}
    service = ConcurrentDeliberationService(AgentOrchestratorStub(latency_ms=10), witness=witness)
    seen: list[str] = []
    result_box: list[object] = []

    async def run() -> None:
        result_box.append(
            await service.invoke_concurrent(
                make_requests(3), on_progress=lambda d, t, a, s: seen.append(a)
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(5.0)  # the agents are long done; the witness is not
        assert seen == [] and result_box == []
        witness.gate.set()
    (result,) = result_box
    assert isinstance(result, ConcurrentResult)
    assert [o.agent_id for o in result.outputs] == ["archon-1", "archon-3"]
    assert {o.output_id for o in witness.committed} == {o.output_id for o in result.outputs}
    (failure,) = result.failures
    assert failure.kind is FailureKind.WITNESS
    assert failure.error_type == "OSError"
    assert "disk full" in failure.message


async def test_reused_output_id_is_invalid_output(autojump_clock: trio.testing.MockClock) -> None:
    from uuid import uuid4

    shared = uuid4()

    class Reuses:
        async def invoke(self, agent_id: str, context: object) -> AgentOutput:
            await trio.sleep(float(agent_id[-1]))  # a deterministic finishing order
            return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="x", output_id=shared)

    result = await ConcurrentDeliberationService(Reuses()).invoke_concurrent(make_requests(3))
    assert [o.agent_id for o in result.outputs] == ["archon-1"]
    assert {f.kind for f in result.failures} == {FailureKind.INVALID_OUTPUT}
    assert "already has" in result.failures[0].message


async def test_an_output_claiming_to_be_resumed_is_invalid_and_not_committed() -> None:
    """``resumed`` marks an answer a resume took from the witness log: an orchestrator
    that sets it would pass a fresh, paid-for answer off as one (transcripts count them)."""

    class ClaimsResumed:
        async def invoke(self, agent_id: str, context: object) -> AgentOutput:
            return AgentOutput(agent_id, uuid4(), "x", metadata={RESUMED: True})

    witness = InstantWitness()
    service = ConcurrentDeliberationService(ClaimsResumed(), witness=witness)
    result = await service.invoke_concurrent(make_requests(2))
    assert result.outputs == ()
    assert {f.kind for f in result.failures} == {FailureKind.INVALID_OUTPUT}
    assert "'resumed'" in result.failures[0].message
    assert witness.log == []


class LeakyCancel:
    """Agent ``bad`` raises a ``trio.Cancelled`` nobody asked for; the others answer."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.sleep(0.1)
        if agent_id == "archon-2":
            raise trio.Cancelled._create()
        return output_of(agent_id)


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


async def test_output_returned_after_its_timeout_is_a_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(SwallowsCancel(latency=10.0), agent_timeout=1.0)
    result = await service.invoke_concurrent(make_requests(2))
    assert result.success_count == 0
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}


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
            return output_of(agent_id)

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


class ConvertsCancel:
    """``archon-1`` answers at t=1; the others would take 10 s, and turn their
    cancellation into an ordinary error (as a client library that wraps every I/O
    failure might)."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        if agent_id == "archon-1":
            await trio.sleep(1.0)
            return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="yes")
        try:
            await trio.sleep(10.0)
        except trio.Cancelled:
            raise RuntimeError("connection aborted") from None
        raise AssertionError("not cut short")


async def test_agents_cut_by_a_halt_are_halted_even_if_they_turn_it_into_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Guards against: the cut agents were ``ERROR``s, reported to ``on_progress`` as "failed" after
    the halt, and since every request then had an outcome the halted batch *returned
    normally*: no ``SystemHaltedError``.  (A timeout already kept its meaning.)"""
    switch = HaltSwitch()
    service = ConcurrentDeliberationService(ConvertsCancel(), switch)
    reported: list[tuple[str, str]] = []

    def on_progress(done: int, total: int, agent_id: str, status: str) -> None:
        reported.append((agent_id, status))

    call = service.invoke_concurrent(make_requests(4), on_progress=on_progress)
    raised = await raised_with_halt_at(2.0, switch, call)
    assert isinstance(raised, SystemHaltedError), repr(raised)
    partial = raised.partial
    assert partial is not None and partial.success_count == 1
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    assert reported == [("archon-1", "completed")]
    assert service.metrics.snapshot().failures_by_kind == {"halted": 3}


@pytest.mark.parametrize(
    ("tail", "kind", "message"),
    [
        ({"quorum": 1}, FailureKind.CANCELLED, "quorum of 1"),
        ({"deadline": 2.0}, FailureKind.TIMEOUT, "batch deadline"),
    ],
)
async def test_agents_cut_by_a_quorum_or_deadline_keep_that_meaning_if_they_raise(
    autojump_clock: trio.testing.MockClock,
    tail: dict[str, Any],
    kind: FailureKind,
    message: str,
) -> None:
    """Guards against: ``ERROR`` ("connection aborted") instead of ``CANCELLED`` / ``TIMEOUT``."""
    service = ConcurrentDeliberationService(ConvertsCancel())
    result = await service.invoke_concurrent(make_requests(4), **tail)
    assert result.success_count == 1
    assert {f.kind for f in result.failures} == {kind}
    assert all(message in f.message for f in result.failures)
