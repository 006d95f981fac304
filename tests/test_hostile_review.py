"""A hostile review of the kernel's promises (issues 9-11): each test is a defect found by
attacking them, shown failing before its fix.  All on trio's virtual clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
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
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    SystemHaltedError,
)
from kernel.validate import check_number, check_seconds
from tests.helpers import ScriptedOrchestrator, Step, make_requests


def _assert_pool_clean(service: ConcurrentDeliberationService) -> None:
    pool = service.pool
    assert pool.active_count == 0 and pool.queued_agents == frozenset()
    assert pool.available_count == pool.max_concurrent


async def _raised(call: Awaitable[object]) -> BaseException | None:
    """What ``call`` raised, whatever it was (a stray ``Cancelled`` must not escape a
    test, where the test runner could take it for its own)."""
    try:
        await call
    except BaseException as exc:  # the point: see everything, Cancelled included
        return exc
    return None


async def _raised_with_halt_at(
    seconds: float, switch: HaltSwitch, call: Awaitable[object]
) -> BaseException | None:
    """What ``call`` raised (see ``_raised``), ``switch`` halting ("operator") once
    ``seconds`` have passed."""

    async def halt_later() -> None:
        await trio.sleep(seconds)
        switch.halt("operator")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(halt_later)
        return await _raised(call)


# ---------------------------------------------------------------- garbage from a halt channel


class GarbageChannel:
    """A polled halt channel whose answers are not what the protocol says."""

    def __init__(self, halted: object, reason: object = None) -> None:
        self.halted = halted
        self.reason = reason

    async def is_halted(self) -> object:
        return self.halted

    async def get_halt_reason(self) -> object:
        return self.reason


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


@pytest.mark.parametrize("answer", [None, 0, "", [], 0.0])
async def test_a_channel_whose_is_halted_is_not_a_bool_counts_as_halted(
    autojump_clock: trio.testing.MockClock, answer: object
) -> None:
    """Was: a falsy non-bool (a forgotten ``return``: None) read as "not halted"."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    garbage: Any = GarbageChannel(answer)
    service = ConcurrentDeliberationService(orchestrator, garbage)
    with pytest.raises(SystemHaltedError, match="not a bool") as caught:
        await service.invoke_concurrent(make_requests(3))
    assert caught.value.partial is None and orchestrator.invoked == []
    _assert_pool_clean(service)


# ---------------------------------------------------------------- a stray Cancelled from a channel


class StrayCancelChannel:
    """A polled halt channel that answers ``good_reads`` times, then raises a
    ``trio.Cancelled`` that no cancel scope asked for."""

    def __init__(self, good_reads: int) -> None:
        self.good_reads = good_reads

    async def is_halted(self) -> bool:
        await trio.sleep(0.01)
        if self.good_reads > 0:
            self.good_reads -= 1
            return False
        raise trio.Cancelled._create()

    async def get_halt_reason(self) -> str | None:
        return None


async def test_a_stray_cancelled_from_the_halt_read_at_batch_start_is_a_halt(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: the bare ``trio.Cancelled`` escaped ``invoke_concurrent`` (no outcome, no
    halt), though a channel that raises counts as halted."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, StrayCancelChannel(0))
    raised = await _raised(service.invoke_concurrent(make_requests(3)))
    assert isinstance(raised, SystemHaltedError), repr(raised)
    assert "halt checker failed" in raised.reason
    assert raised.partial is None and orchestrator.invoked == []
    _assert_pool_clean(service)


async def test_a_stray_cancelled_from_the_halt_watcher_halts_the_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: the watcher's stray Cancelled cancelled every agent and the batch *returned*
    normally, each agent ``CANCELLED`` "not needed: quorum of None reached" (no quorum
    was asked for): a misbehaving halt channel read as a finished batch."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, StrayCancelChannel(1))
    raised = await _raised(service.invoke_concurrent(make_requests(3)))
    assert isinstance(raised, SystemHaltedError), repr(raised)
    assert "halt checker failed" in raised.reason
    partial = raised.partial
    assert partial is not None and partial.total_count == 3
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    _assert_pool_clean(service)


# ---------------------------------------------------------------- a channel's sync parts raise


class ClearChannel:
    """A polled halt channel that is never halted; the ones below break one more part."""

    async def is_halted(self) -> bool:
        return False

    async def get_halt_reason(self) -> str | None:
        return None


class RaisingProbe(ClearChannel):
    """A clear channel whose synchronous probe raises."""

    def halted_now(self) -> bool:
        raise OSError("probe broke")


class RaisingNotifier(ClearChannel):
    """A clear channel that cannot register a halt listener."""

    def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        raise OSError("cannot listen")


@pytest.mark.parametrize("channel", [RaisingProbe, RaisingNotifier])
async def test_a_channel_whose_probe_or_listener_raises_halts_instead_of_crashing(
    autojump_clock: trio.testing.MockClock, channel: type
) -> None:
    """Was: the ``OSError`` escaped ``invoke_concurrent``, no outcome, no halt; a channel
    that raises counts as halted (CT-11: any doubt is a halt)."""
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, channel())
    raised = await _raised(service.invoke_concurrent(make_requests(3)))
    assert isinstance(raised, SystemHaltedError), repr(raised)
    assert "halt checker failed (OSError)" in raised.reason
    assert orchestrator.invoked == []
    partial = raised.partial
    assert partial is not None and partial.total_count == 3
    assert {f.kind for f in partial.failures} == {FailureKind.HALTED}
    _assert_pool_clean(service)


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
    raised = await _raised_with_halt_at(0.5, switch, call)
    assert isinstance(raised, SystemHaltedError) and raised.reason == "operator"
    _assert_pool_clean(service)


class AsyncProbe(ClearChannel):
    """``halted_now`` written as ``async def``: its call is a coroutine, always truthy."""

    async def halted_now(self) -> bool:
        return False


class AsyncNotifier(ClearChannel):
    """``on_halt`` written as ``async def``: it never registers, and its "unregister" is
    a coroutine."""

    async def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        return lambda: None


@pytest.mark.parametrize(
    ("channel", "method"), [(AsyncProbe, "halted_now"), (AsyncNotifier, "on_halt")]
)
def test_a_channel_with_an_async_probe_or_listener_is_refused_when_wired(
    channel: type, method: str
) -> None:
    """Was: accepted; an async ``halted_now`` then halted *every* batch with "halted (no
    reason given)" (a coroutine is truthy) and leaked an un-awaited coroutine; an async
    ``on_halt`` never listened.  The protocols say synchronous: refuse it at once."""
    orchestrator = ScriptedOrchestrator()
    with pytest.raises(InvalidRequestError, match=method):
        ConcurrentDeliberationService(orchestrator, channel())
    with pytest.raises(InvalidRequestError, match=method):
        DualChannelHaltChecker(HaltSwitch(), channel())


# ---------------------------------------------------------------- a cancel turned into an error


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
    """Was: the cut agents were ``ERROR``s, reported to ``on_progress`` as "failed" after
    the halt, and since every request then had an outcome the halted batch *returned
    normally*: no ``SystemHaltedError``.  (A timeout already kept its meaning.)"""
    switch = HaltSwitch()
    service = ConcurrentDeliberationService(ConvertsCancel(), switch)
    reported: list[tuple[str, str]] = []

    def on_progress(done: int, total: int, agent_id: str, status: str) -> None:
        reported.append((agent_id, status))

    call = service.invoke_concurrent(make_requests(4), on_progress=on_progress)
    raised = await _raised_with_halt_at(2.0, switch, call)
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
    """Was: ``ERROR`` ("connection aborted") instead of ``CANCELLED`` / ``TIMEOUT``."""
    service = ConcurrentDeliberationService(ConvertsCancel())
    result = await service.invoke_concurrent(make_requests(4), **tail)
    assert result.success_count == 1
    assert {f.kind for f in result.failures} == {kind}
    assert all(message in f.message for f in result.failures)


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
    _assert_pool_clean(service)


# ---------------------------------------------------------------- on_progress that never runs


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
    """Was: accepted, and silently never run (its call only builds a generator): the
    case issue 9 fixed for ``async def``, one ``yield`` away."""
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(orchestrator)
    with pytest.raises(InvalidRequestError, match="on_progress"):
        await service.invoke_concurrent(make_requests(2), on_progress=on_progress)
    with pytest.raises(InvalidRequestError, match="on_progress"):
        await service.invoke_sequential(make_requests(2), on_progress=on_progress)
    assert orchestrator.invoked == []
    _assert_pool_clean(service)


# ---------------------------------------------------------------- halted, but no reason to be had


class HaltedWithoutReason:
    """Says halted; then fails to say why (its reason store is down)."""

    async def is_halted(self) -> bool:
        return True

    async def get_halt_reason(self) -> str | None:
        raise OSError("reason store down")


async def test_a_channel_that_says_halted_but_cannot_say_why_is_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Was: the failed reason read turned the whole read into a failure, and in a dual
    checker a failed read "lets the other channel decide": the halt was lost, and the
    batch ran to completion."""
    dual = DualChannelHaltChecker(HaltSwitch(), HaltedWithoutReason())
    assert await dual.is_halted()
    orchestrator = ScriptedOrchestrator(default=Step(1.0))
    service = ConcurrentDeliberationService(orchestrator, dual)
    with pytest.raises(SystemHaltedError, match="OSError") as caught:
        await service.invoke_concurrent(make_requests(3))
    assert caught.value.partial is None and orchestrator.invoked == []
    with trio.fail_after(1.0):
        assert "OSError" in await dual.wait_halted()
