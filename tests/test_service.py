"""ConcurrentDeliberationService: admission, outcomes, cancellation, bad input."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentBusyError,
    AgentInvocationError,
    AgentOutput,
    AgentPool,
    AgentPoolExhaustedError,
    AgentRequest,
    CommitReceipt,
    ConcurrentDeliberationService,
    ConcurrentResult,
    FailureKind,
    InvalidRequestError,
    Overflow,
    utc_now,
)
from tests.helpers import ScriptedOrchestrator, Step, make_context, make_requests

# ------------------------------------------------------------------ outcomes


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


async def test_empty_batch_returns_empty_result(service: ConcurrentDeliberationService) -> None:
    result = await service.invoke_concurrent([])
    assert result.total_count == 0
    assert result.outputs == () and result.failures == ()


async def test_progress_reports_each_finish(autojump_clock: trio.testing.MockClock) -> None:
    stub = AgentOrchestratorStub(latency_ms=10, fail_agents={"archon-2"})
    service = ConcurrentDeliberationService(stub)
    seen: list[tuple[int, int, str, str]] = []
    await service.invoke_concurrent(make_requests(4), on_progress=lambda *a: seen.append(a))
    assert [d for d, *_ in seen] == [1, 2, 3, 4]
    assert {t for _, t, *_ in seen} == {4}
    assert ("archon-2", "failed") in {(a, s) for *_, a, s in seen}
    assert sum(s == "completed" for *_, s in seen) == 3


async def test_async_progress_reports_of_a_sequential_run_keep_their_turns(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(latency=1.0)))
    seen: list[tuple[int, str, str]] = []

    async def progress(done: int, total: int, agent_id: str, status: str) -> None:
        await trio.sleep(0.5)  # each report takes a while
        seen.append((done, agent_id, status))

    await service.invoke_sequential(make_requests(2), on_progress=progress)
    assert seen == [
        (0, "archon-1", "starting"),
        (1, "archon-1", "completed"),
        (1, "archon-2", "starting"),
        (2, "archon-2", "completed"),
    ]


async def test_broken_progress_callback_is_logged_not_fatal(
    autojump_clock: trio.testing.MockClock,
    service: ConcurrentDeliberationService,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(*_: object) -> None:
        raise ValueError("display broke")

    result = await service.invoke_concurrent(make_requests(3), on_progress=boom)
    assert result.success_count == 3
    assert sum("on_progress callback raised" in r.message for r in caplog.records) == 3


async def test_failures_are_logged_with_ids_and_never_content(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    stub = AgentOrchestratorStub(latency_ms=1, fail_agents={"archon-1"})
    service = ConcurrentDeliberationService(stub)
    context = make_context("secret-topic")
    requests = make_requests(3, context)
    result = await service.invoke_concurrent(requests)
    failed = [r for r in caplog.records if r.message == "agent failed"]
    assert len(failed) == 1
    assert failed[0].levelno == logging.WARNING
    assert failed[0].agent_id == "archon-1"  # type: ignore[attr-defined]
    assert failed[0].failure_kind == "error"  # type: ignore[attr-defined]
    everything = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    for out in result.outputs:
        assert out.content not in everything
    assert context.topic_content not in everything


# ------------------------------------------------------------------ invoke_single


async def test_invoke_single_returns_output_or_raises_with_failure(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stub = AgentOrchestratorStub(latency_ms=5, fail_agents={"archon-2"})
    pool = AgentPool()
    service = ConcurrentDeliberationService(stub, pool=pool)
    ok, bad = make_requests(2)
    output = await service.invoke_single(ok)
    assert output.request_id == ok.request_id and output.batch_id is not None
    with pytest.raises(AgentInvocationError, match="archon-2") as info:
        await service.invoke_single(bad)
    assert info.value.failure is not None
    assert info.value.failure.kind is FailureKind.ERROR
    assert pool.active_count == 0
    with pytest.raises(InvalidRequestError):
        await service.invoke_single("archon-1")  # type: ignore[arg-type]


# ------------------------------------------------------------------ release on every path


async def test_outer_cancellation_releases_pool_and_propagates(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=100.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    with trio.move_on_after(1.0) as scope:
        await service.invoke_concurrent(make_requests(72))
    assert scope.cancelled_caught
    assert len(orch.cancelled) == 72
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0


async def test_outer_cancellation_in_queue_mode_releases_claims(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pool = AgentPool(4)
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(1.0)), pool=pool)
    with trio.move_on_after(1.5):
        await service.invoke_concurrent(make_requests(20), overflow="queue")
    assert pool.active_count == 0 and pool.queued_agents == frozenset()
    assert pool.limiter.statistics().tasks_waiting == 0


async def test_keyboard_interrupt_propagates_and_releases_pool(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    plan = {"archon-3": Step(latency=1.0, action="keyboard_interrupt")}
    orch = ScriptedOrchestrator(plan, default=Step(latency=100.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    with pytest.raises(KeyboardInterrupt):
        await service.invoke_concurrent(make_requests(10))
    assert pool.active_count == 0 and pool.limiter.borrowed_tokens == 0
    assert len(orch.cancelled) == 9


# ------------------------------------------------------------------ admission


async def test_agent_busy_in_another_batch_is_refused(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    first = make_requests(5)
    second = [AgentRequest("archon-3", first[0].context), AgentRequest("other", first[0].context)]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, first)
        await trio.sleep(1.0)
        overflows: tuple[Overflow, ...] = ("reject", "queue")
        for overflow in overflows:
            with pytest.raises(AgentBusyError, match=r"FR10.*'archon-3'"):
                await service.invoke_concurrent(second, overflow=overflow)
        assert pool.active_agents == {r.agent_id for r in first}
    assert "other" not in orch.invoked
    assert pool.active_count == 0


async def test_two_batches_over_capacity_one_is_refused(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    a, b = make_requests(40, prefix="a"), make_requests(40, prefix="b")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, a)
        await trio.sleep(1.0)
        with pytest.raises(AgentPoolExhaustedError, match=r"FR10.*40 active \+ 40 requested > 72"):
            await service.invoke_concurrent(b)
    assert not any(x.startswith("b-") for x in orch.invoked)
    assert orch.max_in_flight == 40


async def test_two_queued_batches_both_finish_within_capacity(
    autojump_clock: trio.testing.MockClock, pool: AgentPool
) -> None:
    orch = ScriptedOrchestrator(default=Step(latency=10.0))
    service = ConcurrentDeliberationService(orch, pool=pool)
    results = {}

    async def run(name: str) -> None:
        results[name] = await service.invoke_concurrent(
            make_requests(40, prefix=name), overflow="queue"
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run, "a")
        nursery.start_soon(run, "b")
    assert results["a"].success_count == results["b"].success_count == 40
    assert orch.max_in_flight == 72
    assert trio.current_time() == pytest.approx(20.0)  # two waves of 10 s
    assert pool.active_count == 0


async def test_queue_mode_runs_fifo_in_waves(autojump_clock: trio.testing.MockClock) -> None:
    pool = AgentPool(72)
    orch = ScriptedOrchestrator(default=Step(latency=0.010))
    service = ConcurrentDeliberationService(orch, pool=pool)
    requests = make_requests(1000)
    result = await service.invoke_concurrent(requests, overflow="queue")
    assert result.success_count == 1000
    assert orch.max_in_flight == 72
    assert result.total_ms == pytest.approx(math.ceil(1000 / 72) * 10.0)
    # FIFO: the first wave is the first 72 requests
    first_wave = {a for a, t in orch.starts if t == 0.0}
    assert first_wave == {r.agent_id for r in requests[:72]}


async def test_reject_mode_waits_behind_nothing_when_queue_is_full(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A queueing batch holding every slot makes a reject-mode batch fail fast."""
    pool = AgentPool(10)
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(1.0)), pool=pool)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            lambda: service.invoke_concurrent(make_requests(30, prefix="q"), overflow="queue")
        )
        await trio.sleep(0.5)
        with pytest.raises(AgentPoolExhaustedError, match="10 active"):
            await service.invoke_concurrent(make_requests(1, prefix="r"))


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("requests", "match"),
    [
        ("archon-1", "sequence of AgentRequest"),
        (None, "sequence of AgentRequest"),
        (42, "sequence of AgentRequest"),
        (["archon-1"], r"requests\[0\] must be an AgentRequest"),
    ],
)
async def test_bad_request_collections_are_refused(
    service: ConcurrentDeliberationService,
    stub: AgentOrchestratorStub,
    pool: AgentPool,
    requests: object,
    match: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        await service.invoke_concurrent(requests)  # type: ignore[arg-type]
    assert stub.get_invocation_count() == 0 and pool.active_count == 0


async def test_duplicates_are_refused_and_nothing_changes(
    service: ConcurrentDeliberationService, stub: AgentOrchestratorStub, pool: AgentPool
) -> None:
    reqs = make_requests(3)
    dup = [*reqs, AgentRequest("archon-2", reqs[0].context)]
    with pytest.raises(InvalidRequestError, match="'archon-2' appears twice"):
        await service.invoke_concurrent(dup)
    same_request = [reqs[0], reqs[0]]
    with pytest.raises(InvalidRequestError):
        await service.invoke_concurrent(same_request)
    assert stub.get_invocation_count() == 0 and pool.active_count == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"overflow": "drop"}, "overflow"),
        ({"agent_timeout": 0}, "agent_timeout"),
        ({"agent_timeout": -1}, "agent_timeout"),
        ({"agent_timeout": "5"}, "agent_timeout"),
        ({"agent_timeout": math.nan}, "agent_timeout"),
        ({"on_progress": 3}, "on_progress"),
    ],
)
async def test_bad_options_are_refused(
    service: ConcurrentDeliberationService,
    stub: AgentOrchestratorStub,
    kwargs: dict[str, Any],
    match: str,
) -> None:
    with pytest.raises(InvalidRequestError, match=match):
        await service.invoke_concurrent(make_requests(2), **kwargs)
    assert stub.get_invocation_count() == 0


def test_bad_constructor_arguments() -> None:
    stub = AgentOrchestratorStub()
    with pytest.raises(InvalidRequestError, match="orchestrator"):
        ConcurrentDeliberationService(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="halt_checker"):
        ConcurrentDeliberationService(stub, halt_checker=object())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="pool"):
        ConcurrentDeliberationService(stub, pool=72)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="halt_poll_interval"):
        ConcurrentDeliberationService(stub, halt_poll_interval=0)
    with pytest.raises(InvalidRequestError, match="agent_timeout"):
        ConcurrentDeliberationService(stub, agent_timeout=-2)
    with pytest.raises(InvalidRequestError, match="witness"):
        ConcurrentDeliberationService(stub, witness=object())  # type: ignore[arg-type]


# ------------------------------------------------------------------ witness (commit before view)


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


# ------------------------------------------------------------------ metrics


async def test_metrics_snapshot(autojump_clock: trio.testing.MockClock) -> None:
    stub = AgentOrchestratorStub(latency_ms=10, fail_agents={"archon-1"})
    service = ConcurrentDeliberationService(stub)
    await service.invoke_concurrent(make_requests(10))
    stub.set_latency(30)
    await service.invoke_concurrent(make_requests(10))
    with pytest.raises(AgentPoolExhaustedError):
        await service.invoke_concurrent(make_requests(80))
    snap = service.metrics.snapshot()
    assert snap.batches_total == 2
    assert snap.agent_invocations_total == 20
    assert snap.agent_failure_count == 2
    assert snap.pool_exhaustion_errors == 1
    assert snap.halted_batches == 0
    assert snap.pool_active_count == 0
    assert snap.concurrent_invocation_total_ms == pytest.approx(30.0)
    assert snap.p50_ms == pytest.approx(10.0)
    assert snap.p99_ms == pytest.approx(30.0)
    assert service.get_pool_status().as_dict() == {
        "active_count": 0,
        "available_count": 72,
        "max_concurrent": 72,
    }
    assert service.available_capacity == 72 and service.active_count == 0


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
