"""AsyncioHost: asyncio code awaits batches, reads their progress and raises halts, the
kernel running as a trio guest on the asyncio loop.

The tests are plain functions that run asyncio on a plain selector loop (pytest loads
trio-asyncio, whose ``asyncio.run`` would make a trio-asyncio loop instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.asyncio_host import (
    AsyncioHost,
    Deliberation,
    HostClosedError,
    ProgressEvent,
    host_loop,
)
from adapters.halt.file import FileHaltChannel
from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.stub import AgentOrchestratorStub
from adapters.valkey import ValkeyCapacity, ValkeyHaltChannel
from adapters.witness.sqlite import SqliteWitness
from kernel import (
    AgentOutput,
    AgentPool,
    AgentRequest,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    RateLimit,
    SystemHaltedError,
)
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.valkey_server import ValkeyServer, unique_name

T = TypeVar("T")

TOPIC = ContextBundle("motion-7", "Adopt the budget?")


def run_asyncio(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``main`` as an asyncio application does; asyncio's own error reports (a task
    exception never retrieved, a callback that raised) fail the test."""
    reports: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.get_loop().set_exception_handler(lambda _loop, context: reports.append(context))
        result = runner.run(main())
    assert reports == [], reports
    return result


def requests(n: int = 72) -> list[AgentRequest]:
    return [AgentRequest(f"archon-{i}", TOPIC) for i in range(1, n + 1)]


class Recorder:
    """A trio orchestrator that counts starts, finishes and cancellations, and whether any
    agent started after the halt it watches was raised."""

    def __init__(self, halt: HaltSwitch, latency: float = 60.0) -> None:
        self.halt = halt
        self.latency = latency
        self.started = self.finished = self.cancelled = self.started_after_halt = 0
        #: Set (from the trio run, on the host loop's thread) once 72 agents started.
        self.all_started = asyncio.Event()
        self.loops: set[object] = set()

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.started += 1
        self.started_after_halt += self.halt.halted
        self.loops.add(host_loop())
        if self.started == 72:
            self.all_started.set()
        try:
            await trio.sleep(self.latency)
        except trio.Cancelled:
            self.cancelled += 1
            raise
        self.finished += 1
        return AgentOutput(agent_id=agent_id, request_id=context.bundle_id, content="aye")


async def until_all_started(recorder: Recorder, running: Deliberation | asyncio.Task[Any]) -> None:
    """Until the recorder's 72 agents have started; fails at once if the batch ends first."""
    started = asyncio.ensure_future(recorder.all_started.wait())
    if isinstance(running, Deliberation):
        ended: asyncio.Future[Any] = asyncio.ensure_future(_collect(running.events()))
    else:
        ended = running
    await asyncio.wait({started, ended}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        started.cancel()
        raise AssertionError(f"the batch ended before its 72 agents started: {ended}")
    if ended is not running:
        ended.cancel()


def test_an_asyncio_program_awaits_a_72_agent_batch_and_gets_its_result() -> None:
    async def main() -> tuple[int, int, set[object]]:
        halt = HaltSwitch()
        recorder = Recorder(halt, latency=0.05)
        async with AsyncioHost(recorder, halt) as host:
            result = await host.invoke_concurrent(requests())
            assert host.service.get_pool_status().available_count == 72
            return result.success_count, recorder.finished, recorder.loops

    succeeded, finished, loops = run_asyncio(main)
    assert (succeeded, finished) == (72, 72)
    assert len(loops) == 1 and None not in loops  # every agent knew the host loop


def test_a_halt_from_another_asyncio_task_stops_the_batch_at_once() -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt)
        async with AsyncioHost(recorder, halt) as host:
            deliberation = host.start(requests())
            await until_all_started(recorder, deliberation)
            assert await host.ahalt("operator stop") is True
            with pytest.raises(SystemHaltedError) as caught:
                await deliberation.result()
            partial = caught.value.partial
            assert partial is not None and partial.total_count == 72
            assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
            assert recorder.cancelled == 72 and recorder.finished == 0
            assert host.service.get_pool_status().available_count == 72
            assert await host.ahalt("again") is False  # the first reason is kept
            assert halt.reason == "operator stop"
            with pytest.raises(SystemHaltedError):  # halted before: nothing invoked
                await host.invoke_concurrent(requests(3))
            assert recorder.started == 72

    run_asyncio(main)


def test_the_sync_halt_works_from_another_thread() -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt)
        async with AsyncioHost(recorder, halt) as host:
            deliberation = host.start(requests())
            await until_all_started(recorder, deliberation)
            thread = threading.Thread(target=host.halt, args=("from a thread",))
            thread.start()
            with pytest.raises(SystemHaltedError, match="from a thread"):
                await deliberation.result()
            thread.join()
            assert recorder.cancelled == 72

    run_asyncio(main)


def test_progress_reaches_every_subscriber_from_the_first_event_until_the_end() -> None:
    async def main() -> None:
        async with AsyncioHost(AgentOrchestratorStub(latency_ms=5, jitter_ms=5, seed=1)) as host:
            deliberation = host.start(requests(20))
            early = asyncio.create_task(_collect(deliberation.events()))
            result = await deliberation.result()
            late = await _collect(deliberation.events())  # subscribes after the end
            assert await early == late
            assert [e.done for e in late] == list(range(1, 21))
            assert {e.total for e in late} == {20}
            assert {e.status for e in late} == {"completed"}
            assert sorted(e.agent_id for e in late) == sorted(o.agent_id for o in result.outputs)

    run_asyncio(main)


async def _collect(events: Any) -> list[ProgressEvent]:
    return [event async for event in events]


def test_cancelling_the_awaiting_task_cancels_the_batch_and_every_slot_is_back_first() -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt)
        async with AsyncioHost(recorder, halt) as host:
            waiter = asyncio.create_task(host.invoke_concurrent(requests()))
            await until_all_started(recorder, waiter)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            # By the time the CancelledError arrives, the batch has unwound.
            assert recorder.cancelled == 72
            assert host.service.get_pool_status().available_count == 72
            assert not halt.halted  # a cancel is not a halt: the next batch runs
            recorder.latency = 0.001
            assert (await host.invoke_concurrent(requests(5))).success_count == 5

    run_asyncio(main)


def test_a_batch_cancelled_before_its_trio_task_ran_invokes_nothing() -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt)
        async with AsyncioHost(recorder, halt) as host:
            deliberation = host.start(requests())
            deliberation.cancel()  # in the same turn: the trio task has not run yet
            with pytest.raises(asyncio.CancelledError):
                await deliberation.result()
            assert recorder.started == 0

    run_asyncio(main)


def test_leaving_the_host_mid_batch_cancels_it_and_its_awaiter_hears_why() -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt)
        async with AsyncioHost(recorder, halt) as host:
            deliberation = host.start(requests())
            await until_all_started(recorder, deliberation)
        assert recorder.cancelled == 72
        assert host.service.get_pool_status().available_count == 72
        with pytest.raises(HostClosedError):
            await deliberation.result()
        with pytest.raises(RuntimeError, match="async with AsyncioHost"):
            host.start(requests(1))

    run_asyncio(main)


def test_an_application_that_shuts_down_mid_batch_cancels_it_cleanly() -> None:
    """``asyncio.run`` returning while a task deliberates: the loop's shutdown cancels
    that task, the host cancels the batch, the trio run ends before the loop closes."""
    halt = HaltSwitch()
    recorder = Recorder(halt)
    closed: list[bool] = []

    async def app() -> None:
        host = AsyncioHost(recorder, halt)
        try:
            async with host:
                await host.invoke_concurrent(requests())
        finally:
            closed.append(True)

    async def main() -> None:
        running = asyncio.create_task(app())  # left for the shutdown to cancel
        await until_all_started(recorder, running)

    run_asyncio(main)
    assert closed == [True]
    assert recorder.cancelled == 72


def test_bad_input_is_refused_clearly_and_changes_nothing() -> None:
    with pytest.raises(InvalidRequestError, match="agent_timeout"):
        AsyncioHost(AgentOrchestratorStub(), agent_timeout=-1)

    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt, latency=0.001)
        async with AsyncioHost(recorder, halt) as host:
            with pytest.raises(InvalidRequestError):
                await host.invoke_concurrent(["not a request"])  # type: ignore[list-item]
            with pytest.raises(InvalidRequestError, match="events"):
                host.start(requests(2), on_progress=print)
            with pytest.raises(InvalidRequestError):
                await host.ahalt("  ")
            with pytest.raises(InvalidRequestError):
                host.halt("")
            assert not halt.halted and recorder.started == 0
            assert (await host.invoke_concurrent(requests(2))).success_count == 2

    run_asyncio(main)


class ReadOnlyChannel:
    async def is_halted(self) -> bool:
        return False

    async def get_halt_reason(self) -> str | None:
        return None


def test_a_halt_checker_that_cannot_be_raised_is_said_so() -> None:
    async def main() -> None:
        async with AsyncioHost(AgentOrchestratorStub(), ReadOnlyChannel()) as host:
            with pytest.raises(InvalidRequestError, match="cannot be raised from here"):
                await host.ahalt("stop")

    run_asyncio(main)


async def test_a_host_inside_a_loop_that_already_runs_in_trio_is_refused_clearly() -> None:
    import trio_asyncio

    async def enter() -> None:
        async with AsyncioHost(AgentOrchestratorStub()):
            pass

    async with trio_asyncio.open_loop() as loop:
        with pytest.raises(RuntimeError, match="already runs inside trio"):
            await loop.run_aio_coroutine(enter())


def test_the_host_loop_keeps_ticking_through_a_72_agent_batch() -> None:
    """A 1 ms asyncio heartbeat goes on while 72 agents run: nothing holds the loop for
    the batch (the largest gap is measured in benchmarks/, not asserted here)."""

    async def main() -> int:
        ticks = 0

        async def heartbeat() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        async with AsyncioHost(AgentOrchestratorStub(latency_ms=300, jitter_ms=50)) as host:
            beating = asyncio.create_task(heartbeat())
            await asyncio.sleep(0)
            result = await host.invoke_concurrent(requests())
            beating.cancel()
            assert result.success_count == 72
        return ticks

    # 300 ms of batch at 1 ms a beat: a loop held for the batch would see one or two;
    # a loaded machine still gives the loop far more than ten turns.
    assert run_asyncio(main) >= 10


def test_tail_control_witness_and_rate_limit_work_under_the_host(tmp_path: Path) -> None:
    witness = SqliteWitness(tmp_path / "witness.db")

    async def main() -> None:
        stub = AgentOrchestratorStub(latency_ms=5, fail_agents=("archon-3",))
        host = AsyncioHost(
            stub, witness=witness, rate_limit=RateLimit(2000, burst=72), agent_timeout=5
        )
        async with host:
            result = await host.invoke_concurrent(requests(12))
            assert result.success_count == 11 and result.failed_agents == ("archon-3",)
            assert await host.run(witness.count) == 11  # commits ran in worker threads
            quorum = await host.invoke_concurrent(requests(12), quorum=4)
            assert quorum.success_count >= 4
            stub.set_latency(10_000)
            timed_out = await host.invoke_concurrent(requests(6), deadline=0.05)
            assert {f.kind for f in timed_out.failures} == {FailureKind.TIMEOUT}
            stub.set_latency(100)
            hedged = await host.invoke_concurrent(
                requests(10), hedge=HedgePolicy(delay=0.01, budget=0.5)
            )
            assert hedged.success_count == 9 and len(hedged.hedged_agents) == 5  # archon-3 fails

    run_asyncio(main)


def test_a_halt_during_witness_commits_releases_nothing_uncommitted(tmp_path: Path) -> None:
    witness = SqliteWitness(tmp_path / "witness.db")

    async def main() -> None:
        halt = HaltSwitch()
        stub = AgentOrchestratorStub(latency_ms=1, jitter_ms=20, seed=3)
        async with AsyncioHost(stub, halt, witness=witness) as host:
            deliberation = host.start(requests())
            async for event in deliberation.events():
                if event.done == 10:
                    host.halt("mid-commit")
            try:
                result = await deliberation.result()
                released = {o.output_id for o in result.outputs}
            except SystemHaltedError as exc:
                assert exc.partial is not None
                released = {o.output_id for o in exc.partial.outputs}
            committed = await host.run(witness.count)
            assert committed == len(released)

    run_asyncio(main)


# ---------------------------------------------------------------------- the OpenAI adapter


def test_openai_agents_run_on_the_host_loop_and_a_halt_closes_all_72_requests(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = "hang"

    async def main() -> tuple[float, int]:
        llm = OpenAIChatOrchestrator(llm_server.base_url, "fake-model", max_retries=0)
        async with AsyncioHost(AsyncioOrchestratorBridge(llm)) as host:
            deliberation = host.start(requests())
            reached = await asyncio.to_thread(llm_server.wait_for, lambda s: s.in_flight >= 72)
            assert reached, "the 72 requests never reached the server"
            started = time.perf_counter()
            host.halt("operator stop")
            with pytest.raises(SystemHaltedError) as caught:
                await deliberation.result()
            stopped_s = time.perf_counter() - started
            assert caught.value.partial is not None
            assert caught.value.partial.failure_count == 72
            closed = await asyncio.to_thread(llm_server.wait_for, lambda s: s.disconnects >= 72)
            assert closed, f"only {llm_server.disconnects} of 72 requests were closed"
            return stopped_s, llm_server.disconnects

    _stopped_s, disconnects = run_asyncio(main)
    assert disconnects == 72
    assert llm_server.in_flight == 0


# ---------------------------------------------------------------------- property


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    agents=st.integers(1, 24),
    halt_after=st.integers(0, 24),
    latencies=st.lists(st.integers(0, 20), min_size=24, max_size=24),
)
def test_every_request_has_one_outcome_and_nothing_starts_after_a_halt(
    agents: int, halt_after: int, latencies: list[int]
) -> None:
    """Hypothesis: through the host, with a halt after any number of outcomes."""

    class Varied(Recorder):
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            self.latency = latencies[int(agent_id.split("-")[1]) - 1] / 1000
            return await super().invoke(agent_id, context)

    async def main() -> None:
        halt = HaltSwitch()
        recorder = Varied(halt)
        batch = requests(agents)
        async with AsyncioHost(recorder, halt, pool=None) as host:
            deliberation = host.start(batch, overflow="queue")
            if halt_after == 0:
                host.halt("at once")
            async for event in deliberation.events():
                if event.done == halt_after:
                    host.halt("mid-batch")
            try:
                result = await deliberation.result()
            except SystemHaltedError as exc:
                if exc.partial is None:  # halted before it began: nothing invoked
                    assert recorder.started == 0
                    return
                result = exc.partial
            ids = [o.agent_id for o in result.outputs] + list(result.failed_agents)
            assert sorted(ids) == sorted(r.agent_id for r in batch)
            assert recorder.started_after_halt == 0
            assert host.service.get_pool_status().available_count == 72

    run_asyncio(main)


# ---------------------------------------------------------------------- beyond one process


def test_a_valkey_halt_and_shared_capacity_work_through_the_host(
    valkey_server: ValkeyServer,
) -> None:
    """The host enters the channel and the capacity in its trio run, and leaves them."""
    name = unique_name()
    valkey_server.seed_capacity(name)
    channel = ValkeyHaltChannel(valkey_server.url, key=unique_name())
    capacity = ValkeyCapacity(valkey_server.url, name=name)
    switch = HaltSwitch()  # only the recorder's view of "halted"
    recorder = Recorder(switch)

    async def main() -> None:
        async with AsyncioHost(recorder, channel, AgentPool(72, shared=capacity)) as host:
            # A fresh key reads halted: two approvers clear it first.
            clear = functools.partial(channel.aclear, approvers=["alice", "bob"], reason="new")
            await host.run(clear)
            await host.run(channel.wait_cleared)
            deliberation = host.start(requests())
            await until_all_started(recorder, deliberation)
            assert capacity.in_use() == 72
            assert await host.ahalt("cluster stop") is True
            with pytest.raises(SystemHaltedError, match="cluster stop"):
                await deliberation.result()
            assert recorder.cancelled == 72
            assert capacity.held == frozenset()
            with pytest.raises(SystemHaltedError):  # the server keeps the halt
                await host.invoke_concurrent(requests(2))

    run_asyncio(main)


class Crashes:
    """A part (an async context manager the host enters) whose background task fails once
    ``crash`` is set: the trio run ends with its error."""

    def __init__(self) -> None:
        self.crash = trio.Event()
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Crashes:
        nursery = await self._stack.enter_async_context(trio.open_nursery())
        nursery.start_soon(self._fail)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        return await self._stack.__aexit__(exc_type, exc, tb)

    async def _fail(self) -> None:
        await self.crash.wait()
        raise OSError("the part broke")

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.crash.set()
        await trio.sleep(60)
        raise AssertionError("not reached")


def test_a_trio_run_that_crashes_closes_the_host_and_says_why() -> None:
    async def main() -> None:
        host = AsyncioHost(Crashes())
        await host.__aenter__()
        with pytest.raises(HostClosedError):
            await host.invoke_concurrent(requests(3))
        with pytest.raises(HostClosedError):  # refused, or the run has ended by now
            await host.invoke_concurrent(requests(1))
        with pytest.raises(BaseExceptionGroup) as crashed:
            await host.__aexit__(None, None, None)
        assert crashed.group_contains(OSError, match="the part broke")

    run_asyncio(main)


def test_leaving_the_host_with_a_batch_nobody_awaits_reports_nothing_to_asyncio() -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt)
        async with AsyncioHost(recorder, halt) as host:
            deliberation = host.start(requests())
            await until_all_started(recorder, deliberation)
        del deliberation
        gc.collect()  # an unretrieved exception is reported when its future is collected

    run_asyncio(main)  # fails on any report to the loop's exception handler


def test_a_halt_raised_while_the_host_closes_still_reaches_its_channel(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"

    async def main() -> None:
        host = AsyncioHost(AgentOrchestratorStub(latency_ms=1), FileHaltChannel(path))
        await host.__aenter__()
        closing = asyncio.ensure_future(host.__aexit__(None, None, None))
        await asyncio.sleep(0)  # the close has begun: the run is being cancelled
        host.halt("raised during shutdown")
        await closing

    run_asyncio(main)
    assert "raised during shutdown" in path.read_text()


@pytest.mark.parametrize("call", ["invoke_concurrent", "start", "run", "ahalt"])
def test_a_call_from_another_event_loop_is_refused_and_starts_nothing(call: str) -> None:
    async def main() -> None:
        halt = HaltSwitch()
        recorder = Recorder(halt, latency=0.01)
        async with AsyncioHost(recorder, halt) as host:
            calls: dict[str, Callable[[], Any]] = {
                "invoke_concurrent": lambda: host.invoke_concurrent(requests(3)),
                "start": lambda: host.start(requests(3)),
                "run": lambda: host.run(host.service.invoke_concurrent, requests(3)),
                "ahalt": lambda: host.ahalt("from another loop"),
            }

            async def elsewhere() -> None:
                made = calls[call]()
                if asyncio.iscoroutine(made):
                    await made

            def in_another_thread() -> None:
                with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
                    runner.run(elsewhere())

            with pytest.raises(RuntimeError, match="from the thread of the loop it was opened"):
                await asyncio.to_thread(in_another_thread)
            await host.run(trio.testing.wait_all_tasks_blocked)
            assert recorder.started == 0 and not halt.halted
            assert host.service.get_pool_status().active_count == 0

    run_asyncio(main)
