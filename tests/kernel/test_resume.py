"""Resuming a batch: only the agents without a committed output run again, the committed
ones come back as committed, and a resume of anything but the same request set is
refused having invoked nothing."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from uuid import UUID, uuid4

import attrs
import pytest
import trio
import trio.testing

from adapters.valkey import ValkeyCapacity
from adapters.witness.sqlite import SqliteWitness
from kernel import (
    RESUMED,
    AgentOutput,
    AgentPool,
    AgentRequest,
    CommitReceipt,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    RateLimit,
    RecordedBatch,
    SystemHaltedError,
    context_fingerprint,
)
from kernel._resume import mark_resumed
from tests.support.helpers import (
    ScriptedOrchestrator,
    Step,
    assert_one_outcome_per_request_in_order,
    make_context,
    make_requests,
)
from tests.support.hostile_parts import InstantWitness, assert_pool_clean, raised_with_halt_at
from tests.support.valkey_server import ValkeyServer
from tests.support.witness_helpers import select

FOREVER = Step(action="forever")


def _stuck(requests: list[AgentRequest], stuck: range) -> ScriptedOrchestrator:
    """Agents at the ``stuck`` indexes never answer; the others answer at once."""
    return ScriptedOrchestrator({requests[i].agent_id: FOREVER for i in stuck})


async def _first_run(
    witness: SqliteWitness, requests: list[AgentRequest], stuck: range
) -> ConcurrentResult:
    """A run halted once every agent but those at the ``stuck`` indexes (which never
    answer) has answered; returns its partial result."""
    switch = HaltSwitch()
    answers = len(requests) - len(stuck)

    def progress(done: int, _total: int, _agent: str, _status: str) -> None:
        if done == answers:
            switch.halt("operator stop")

    orchestrator = _stuck(requests, stuck)
    service = ConcurrentDeliberationService(orchestrator, switch, witness=witness)
    with pytest.raises(SystemHaltedError) as caught:
        await service.invoke_concurrent(requests, on_progress=progress)
    partial = caught.value.partial
    assert partial is not None and partial.success_count == answers
    return partial


def _rerun(requests: list[AgentRequest]) -> list[AgentRequest]:
    """The same deliberation as a new process builds it: same agents and topic, a new
    bundle (id, timestamp) and new request ids."""
    context = requests[0].context
    again = ContextBundle(
        topic_id=context.topic_id, topic_content=context.topic_content, metadata=context.metadata
    )
    return [AgentRequest(agent_id=r.agent_id, context=again) for r in requests]


# ------------------------------------------------------------------ what runs again


async def test_a_resume_invokes_only_the_agents_without_a_committed_output(tmp_path: Path) -> None:
    requests = make_requests(6)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(3, 6))
        assert first.success_count == 3
        again = _rerun(requests)
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, witness=witness)
        result = await service.invoke_concurrent(again, resume=str(first.batch_id))
        assert sorted(orchestrator.invoked) == ["archon-4", "archon-5", "archon-6"]
        assert result.batch_id == first.batch_id
        assert result.success_count == 6 and result.failure_count == 0
        assert_one_outcome_per_request_in_order(again, result)
        assert await witness.count() == 6
    assert_pool_clean(service)


async def test_resumed_outputs_come_back_as_committed_marked_resumed(tmp_path: Path) -> None:
    requests = make_requests(4)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(2, 4))
        service = ConcurrentDeliberationService(ScriptedOrchestrator(), witness=witness)
        result = await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        for before, after in zip(first.outputs, result.outputs[:2], strict=True):
            committed = await witness.get_for_viewing(before.output_id, "auditor")
            assert after.metadata[RESUMED] is True
            # Every field as committed (request id of the first run included); only the
            # returned copy carries the mark, the log keeps the output as it was.
            assert attrs.evolve(after, metadata=committed.metadata) == committed == before
            assert after.content_hash == before.content_hash
        assert all(RESUMED not in o.metadata for o in result.outputs[2:])
        assert (await witness.verify()).ok


async def test_a_halted_batch_cleared_and_resumed_calls_only_the_cancelled_and_unstarted(
    tmp_path: Path,
) -> None:
    requests = make_requests(8)
    switch = HaltSwitch()
    # Agents 1-3 answer; 4-8 never do: four of them hold the pool's slots when the halt
    # comes, the last one queues behind them and never starts.
    orchestrator = _stuck(requests, range(3, 8))
    done = 0

    def progress(_done: int, _total: int, _agent: str, _status: str) -> None:
        nonlocal done
        done += 1
        if done == 3:
            switch.halt("operator stop")

    pool = AgentPool(4)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        service = ConcurrentDeliberationService(orchestrator, switch, pool, witness=witness)
        with pytest.raises(SystemHaltedError) as caught:
            await service.invoke_concurrent(requests, overflow="queue", on_progress=progress)
        partial = caught.value.partial
        assert partial is not None and partial.success_count == 3
        assert "archon-8" not in orchestrator.invoked
        switch.clear(approvers=("alice", "bob"), reason="checked")
        again = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(again, switch, pool, witness=witness)
        result = await service.invoke_concurrent(
            _rerun(requests), overflow="queue", resume=partial.batch_id
        )
        # The cancelled and the never started, nobody else.
        assert sorted(again.invoked) == [f"archon-{i}" for i in range(4, 9)]
        assert again.max_in_flight <= 4
        assert result.success_count == 8
        assert select(tmp_path / "w.db", "SELECT run FROM batch_runs ORDER BY run") == [(1,), (2,)]
    assert_pool_clean(service)


async def test_a_complete_batch_resumed_invokes_nothing_and_records_no_run(
    tmp_path: Path,
) -> None:
    requests = make_requests(3)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        service = ConcurrentDeliberationService(ScriptedOrchestrator(), witness=witness)
        first = await service.invoke_concurrent(requests)
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, witness=witness)
        result = await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        assert orchestrator.invoked == []
        assert [o.output_id for o in result.outputs] == [o.output_id for o in first.outputs]
    assert select(tmp_path / "w.db", "SELECT count(*) FROM batch_runs") == [(1,)]


async def test_a_quorum_counts_the_resumed_outputs(tmp_path: Path) -> None:
    requests = make_requests(6)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(3, 6))
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, witness=witness)
        reached = await service.invoke_concurrent(_rerun(requests), quorum=3, resume=first.batch_id)
        assert orchestrator.invoked == []
        assert reached.success_count == 3
        assert {f.kind for f in reached.failures} == {FailureKind.CANCELLED}
        one_more = await service.invoke_concurrent(
            _rerun(requests), quorum=4, resume=first.batch_id
        )
        assert len(orchestrator.invoked) >= 1 and one_more.success_count >= 4


async def test_a_resumed_run_keeps_its_deadline_and_hedges_only_agents_it_runs(
    tmp_path: Path,
) -> None:
    requests = make_requests(6)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(3, 6))
        # archon-4 is slow (hedged, then answers), archon-6 never answers.  Real time: a
        # commit waits for the witness's thread, which a mock clock would jump over.
        plan = {"archon-4": Step(latency=0.2), "archon-6": FOREVER}
        orchestrator = ScriptedOrchestrator(plan)
        service = ConcurrentDeliberationService(orchestrator, witness=witness)
        result = await service.invoke_concurrent(
            _rerun(requests),
            resume=first.batch_id,
            deadline=0.8,
            hedge=HedgePolicy(delay=0.05, budget=1.0),
        )
        assert "archon-4" in result.hedged_agents
        assert set(result.hedged_agents) <= {"archon-4", "archon-5", "archon-6"}
        assert [f.agent_id for f in result.failures] == ["archon-6"]
        assert result.failures[0].kind is FailureKind.TIMEOUT
        assert set(orchestrator.invoked) == {"archon-4", "archon-5", "archon-6"}


async def test_a_resumed_runs_hedge_budget_is_a_share_of_the_agents_it_runs(
    tmp_path: Path,
) -> None:
    """Half of 2 agents run now is 1 hedge, not half of the batch's 10: the budget bounds
    the duplicate calls this run pays for."""
    requests = make_requests(10)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(8, 10))
        # Real time: a commit waits for the witness's thread (a mock clock jumps over it).
        slow = Step(latency=0.3)
        orchestrator = ScriptedOrchestrator({"archon-9": slow, "archon-10": slow})
        service = ConcurrentDeliberationService(orchestrator, witness=witness)
        result = await service.invoke_concurrent(
            _rerun(requests), resume=first.batch_id, hedge=HedgePolicy(delay=0.05, budget=0.5)
        )
        assert result.success_count == 10
        assert len(result.hedged_agents) == 1
        assert sorted(orchestrator.invoked) == sorted(
            ["archon-9", "archon-10", *result.hedged_agents]
        )


async def test_progress_reports_the_agents_run_now_counting_the_resumed_ones(
    tmp_path: Path,
) -> None:
    requests = make_requests(5)
    reports: list[tuple[int, int, str, str]] = []
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(3, 5))
        service = ConcurrentDeliberationService(ScriptedOrchestrator(), witness=witness)
        await service.invoke_concurrent(
            _rerun(requests),
            resume=first.batch_id,
            on_progress=lambda *report: reports.append(report),
        )
    assert sorted(done for done, _, _, _ in reports) == [4, 5]  # counting the 3 resumed
    assert sorted((total, agent, status) for _, total, agent, status in reports) == [
        (5, "archon-4", "completed"),
        (5, "archon-5", "completed"),
    ]


class Rendezvous:
    """An orchestrator whose calls all wait until ``calls`` of them have started."""

    def __init__(self, calls: int) -> None:
        self.calls, self.started = calls, 0
        self.everyone = trio.Event()

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.started += 1
        if self.started == self.calls:
            self.everyone.set()
        await self.everyone.wait()
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"{agent_id}: yes")


async def test_two_outputs_of_one_agent_never_enter_one_batch(tmp_path: Path) -> None:
    """Two resumes of one batch at once (two processes) both read the log before either
    commits, so both call the missing agent: the log takes one answer, the other run gets
    a WITNESS failure for it."""
    requests = make_requests(2)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(1, 2))
        both = Rendezvous(2)
        results: list[ConcurrentResult] = []

        async def resume() -> None:
            service = ConcurrentDeliberationService(both, witness=witness)
            results.append(await service.invoke_concurrent(_rerun(requests), resume=first.batch_id))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resume)
            nursery.start_soon(resume)
        assert sorted(r.success_count for r in results) == [1, 2]
        loser = min(results, key=lambda r: r.success_count)
        assert loser.failures[0].kind is FailureKind.WITNESS
        assert "already has an output" in loser.failures[0].message
        assert await witness.count() == 2


# ------------------------------------------------------------------ refusals


async def _refused(
    witness: SqliteWitness, requests: list[AgentRequest], resume: object
) -> tuple[str, ScriptedOrchestrator, ConcurrentDeliberationService]:
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator, witness=witness)
    before = await witness.count()
    with pytest.raises(InvalidRequestError) as caught:
        await service.invoke_concurrent(requests, resume=resume)  # type: ignore[arg-type]
    assert orchestrator.invoked == []
    assert await witness.count() == before
    assert_pool_clean(service)
    return str(caught.value), orchestrator, service


async def test_a_resume_with_other_agents_is_refused_naming_them(tmp_path: Path) -> None:
    requests = make_requests(4)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(2, 4))
        fewer = _rerun(requests)[:3]
        message, _, _ = await _refused(witness, fewer, first.batch_id)
        assert "missing 'archon-4'" in message
        more = [*_rerun(requests), AgentRequest(agent_id="archon-9", context=make_context())]
        message, _, _ = await _refused(witness, more, first.batch_id)
        assert "not in it 'archon-9'" in message


async def test_a_resume_on_another_topic_is_refused(tmp_path: Path) -> None:
    requests = make_requests(3)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(1, 3))
        other = make_requests(3, make_context("another topic"))
        message, _, _ = await _refused(witness, other, first.batch_id)
        assert "context differs" in message


async def test_a_resume_of_a_batch_not_in_the_log_is_refused(tmp_path: Path) -> None:
    async with SqliteWitness(tmp_path / "w.db") as witness:
        message, _, _ = await _refused(witness, make_requests(2), uuid4())
        assert "nothing of batch" in message


@pytest.mark.parametrize("resume", ["not-a-batch-id", 42, b"x"])
async def test_a_resume_that_is_not_a_batch_id_is_refused(tmp_path: Path, resume: object) -> None:
    async with SqliteWitness(tmp_path / "w.db") as witness:
        message, _, _ = await _refused(witness, make_requests(2), resume)
        assert "resume must be a batch id" in message


@pytest.mark.parametrize("witness", [None, InstantWitness()])
async def test_a_resume_needs_a_witness_that_records_batches(witness: object) -> None:
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator, witness=witness)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="records batches"):
        await service.invoke_concurrent(make_requests(2), resume=uuid4())
    assert orchestrator.invoked == []


async def test_a_halted_system_refuses_a_resume_before_reading_the_log(tmp_path: Path) -> None:
    switch = HaltSwitch()
    switch.halt("stop")
    async with SqliteWitness(tmp_path / "w.db") as witness:
        service = ConcurrentDeliberationService(ScriptedOrchestrator(), switch, witness=witness)
        with pytest.raises(SystemHaltedError) as caught:
            await service.invoke_concurrent(make_requests(2), resume="not even a batch id")
    assert caught.value.partial is None


# ------------------------------------------------------------------ fingerprint


def test_the_context_fingerprint_ignores_the_bundle_id_and_creation_time() -> None:
    context = make_context()
    again = ContextBundle(
        topic_id=context.topic_id, topic_content=context.topic_content, metadata=context.metadata
    )
    assert context.bundle_id != again.bundle_id
    assert context_fingerprint(context) == context_fingerprint(again)


@pytest.mark.parametrize(
    "other",
    [
        ContextBundle(topic_id="topic-2", topic_content="x"),
        ContextBundle(topic_id="topic-1", topic_content="y"),
        ContextBundle(topic_id="topic-1", topic_content="x", metadata={"k": "v"}),
        ContextBundle(topic_id="topic-1x", topic_content=""),
    ],
)
def test_the_context_fingerprint_changes_with_topic_content_and_metadata(
    other: ContextBundle,
) -> None:
    base = ContextBundle(topic_id="topic-1", topic_content="x")
    assert context_fingerprint(base) != context_fingerprint(other)


def test_resumed_outputs_keep_the_batch_id_they_were_committed_with() -> None:
    output = AgentOutput(agent_id="a", request_id=uuid4(), content="c", batch_id=UUID(int=7))
    marked = mark_resumed(output)
    assert marked.batch_id == UUID(int=7) and marked.metadata == {RESUMED: True}


async def test_resumed_agents_take_no_turn_of_the_rate_limit(tmp_path: Path) -> None:
    """The limit has turns for the agents to run and refills too slowly for one more: a
    resumed agent waiting for a turn would hang the run."""
    requests = make_requests(5)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(3, 5))
        limit = RateLimit(per_second=0.001, burst=2)
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, witness=witness, rate_limit=limit)
        with trio.fail_after(10):
            result = await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        assert result.success_count == 5
        assert sorted(orchestrator.invoked) == ["archon-4", "archon-5"]
        assert limit.statistics().tokens < 1


async def test_a_resume_reserves_the_shared_capacity_only_for_the_agents_it_runs(
    tmp_path: Path, valkey_server: ValkeyServer
) -> None:
    """A cluster-wide capacity of 2: a batch of 5 with 3 answers committed resumes in
    reject mode (all or nothing), as its 2 remaining agents fit."""
    name = f"resume-{uuid4().hex[:8]}"
    valkey_server.seed_capacity(name)
    requests = make_requests(5)
    async with (
        SqliteWitness(tmp_path / "w.db") as witness,
        ValkeyCapacity(valkey_server.url, name=name, capacity=2) as capacity,
    ):
        first = await _first_run(witness, requests, stuck=range(3, 5))
        orchestrator = ScriptedOrchestrator()
        pool = AgentPool(shared=capacity)
        service = ConcurrentDeliberationService(orchestrator, pool=pool, witness=witness)
        result = await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        assert result.success_count == 5
        assert sorted(orchestrator.invoked) == ["archon-4", "archon-5"]
    assert_pool_clean(service)


# ------------------------------------------------------------------ at the worst moment


class _HaltingLog:
    """The SQLite witness, with a halt raised while the resume reads the log or as the
    first output of the resumed run is committed."""

    def __init__(self, witness: SqliteWitness, switch: HaltSwitch, *, on: str) -> None:
        self.witness, self.switch, self.on = witness, switch, on

    async def commit(self, output: AgentOutput) -> CommitReceipt:
        receipt = await self.witness.commit(output)
        if self.on == "commit":
            self.on = ""
            self.switch.halt("halted mid-commit")
        return receipt

    def begin_run(self, batch_id: UUID, requests: Mapping[str, str]) -> Callable[[], None]:
        return self.witness.begin_run(batch_id, requests)

    async def recorded_batch(self, batch_id: UUID) -> RecordedBatch | None:
        recorded = await self.witness.recorded_batch(batch_id)
        if self.on == "read":
            self.switch.halt("halted mid-read")
        return recorded


async def test_a_halt_while_the_resume_reads_the_log_invokes_nobody(tmp_path: Path) -> None:
    requests = make_requests(4)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(2, 4))
        switch = HaltSwitch()
        orchestrator = ScriptedOrchestrator()
        log = _HaltingLog(witness, switch, on="read")
        service = ConcurrentDeliberationService(orchestrator, switch, witness=log)
        with pytest.raises(SystemHaltedError) as caught:
            await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        assert orchestrator.invoked == []
        partial = caught.value.partial
        assert partial is not None and partial.success_count == 2
        assert [f.kind for f in partial.failures] == [FailureKind.HALTED] * 2
        assert await witness.count() == 2
    assert_pool_clean(service)


async def test_a_halt_during_the_resumed_runs_first_commit_then_a_resume_ends_each_agent_once(
    tmp_path: Path,
) -> None:
    requests = make_requests(6)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(2, 6))
        switch = HaltSwitch()
        log = _HaltingLog(witness, switch, on="commit")
        again = _rerun(requests)
        service = ConcurrentDeliberationService(_stuck(again, range(3, 6)), switch, witness=log)
        with pytest.raises(SystemHaltedError) as caught:
            await service.invoke_concurrent(again, resume=first.batch_id)
        # The commit was past its point of no return: its answer is kept, released.
        partial = caught.value.partial
        assert partial is not None and partial.success_count == 3
        assert switch.clear(approvers=["alice", "bob"], reason="checked")
        committed = await witness.count()
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, switch, witness=witness)
        result = await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        assert result.success_count == 6
        assert len(orchestrator.invoked) == 6 - committed
        agents = select(tmp_path / "w.db", "SELECT agent_id FROM outputs ORDER BY agent_id")
        assert agents == [(r.agent_id,) for r in sorted(requests, key=lambda r: r.agent_id)]
        assert (await witness.verify()).ok


async def test_a_resume_in_queue_mode_runs_more_agents_than_the_pool_holds(tmp_path: Path) -> None:
    requests = make_requests(8)
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(3, 8))
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, pool=AgentPool(2), witness=witness)
        result = await service.invoke_concurrent(
            _rerun(requests)[::-1], resume=first.batch_id, overflow="queue"
        )
        assert result.success_count == 8
        assert sorted(orchestrator.invoked) == [f"archon-{i}" for i in range(4, 9)]
        assert [o.agent_id for o in result.outputs] == [f"archon-{i}" for i in range(8, 0, -1)]
    assert_pool_clean(service)


class _HangingLog(InstantWitness):
    """A batch log whose reads never return (a stuck disk, a remote log gone quiet)."""

    def begin_run(self, batch_id: UUID, requests: Mapping[str, str]) -> Callable[[], None]:
        return lambda: None

    async def recorded_batch(self, batch_id: UUID) -> RecordedBatch | None:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


@pytest.mark.parametrize("channel", ["switch", "polled"])
async def test_a_halt_while_the_resume_reads_a_stuck_log_ends_the_call_invoking_nobody(
    autojump_clock: trio.testing.MockClock, channel: str
) -> None:
    switch = HaltSwitch()
    checker = switch if channel == "switch" else _Polled(switch)
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator, checker, witness=_HangingLog())
    with trio.fail_after(60):
        raised = await raised_with_halt_at(
            1, switch, service.invoke_concurrent(make_requests(3), resume=uuid4())
        )
    assert isinstance(raised, SystemHaltedError) and raised.reason == "operator"
    assert orchestrator.invoked == []
    assert_pool_clean(service)


class _Polled:
    """A halt channel that is only polled (no call back from its halt())."""

    def __init__(self, switch: HaltSwitch) -> None:
        self.switch = switch

    async def is_halted(self) -> bool:
        return await self.switch.is_halted()

    async def get_halt_reason(self) -> str | None:
        return await self.switch.get_halt_reason()


async def test_a_topic_that_utf8_cannot_encode_is_recorded_and_resumed(tmp_path: Path) -> None:
    """A lone surrogate (JSON's "\\ud800") is a str a ContextBundle takes: the fingerprint
    and the recorded request set must not fail on it."""
    context = ContextBundle(topic_id="t", topic_content="c\ud800", metadata={"k": "\udfff"})
    requests = [AgentRequest(f"archon-{i}", context) for i in range(1, 4)]
    async with SqliteWitness(tmp_path / "w.db") as witness:
        first = await _first_run(witness, requests, stuck=range(2, 3))
        orchestrator = ScriptedOrchestrator()
        service = ConcurrentDeliberationService(orchestrator, witness=witness)
        result = await service.invoke_concurrent(_rerun(requests), resume=first.batch_id)
        assert result.success_count == 3
        assert orchestrator.invoked == ["archon-3"]
    assert context_fingerprint(context) != context_fingerprint(make_context())
