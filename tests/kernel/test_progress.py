"""on_progress: every outcome reported, sync or async; errors ignored; nothing withheld."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentPool,
    ConcurrentDeliberationService,
    HaltSwitch,
    InvalidRequestError,
)
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import Instant, SwallowsCancel, assert_pool_clean


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


async def _progress_agen(done: int, total: int, agent_id: str, status: str) -> AsyncIterator[None]:
    yield  # an async generator: calling it runs nothing


def _progress_gen(done: int, total: int, agent_id: str, status: str) -> Iterator[None]:
    yield


class _AsyncGenCall:
    async def __call__(
        self, done: int, total: int, agent_id: str, status: str
    ) -> AsyncIterator[None]:
        yield


@pytest.mark.parametrize("on_progress", [_progress_agen, _progress_gen, _AsyncGenCall()])
async def test_an_on_progress_that_would_never_run_is_refused(
    autojump_clock: trio.testing.MockClock, on_progress: Any
) -> None:
    """Guards against: accepted, and silently never run (its call only builds a
    generator): the ``async def`` case, one ``yield`` away."""
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator)
    with pytest.raises(InvalidRequestError, match="on_progress"):
        await service.invoke_concurrent(make_requests(2), on_progress=on_progress)
    with pytest.raises(InvalidRequestError, match="on_progress"):
        await service.invoke_sequential(make_requests(2), on_progress=on_progress)
    assert orchestrator.invoked == []
    assert_pool_clean(service)
