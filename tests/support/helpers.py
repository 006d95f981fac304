"""Test doubles: a scripted trio orchestrator, request builders, and runners for halts."""

from __future__ import annotations

import math
import resource
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from uuid import uuid4

import trio
import trio.testing

from adapters.llm.ratelimit_headers import RateLimitHeaders
from kernel import (
    AgentOutput,
    AgentRequest,
    ConcurrentResult,
    ContextBundle,
    HaltSwitch,
    SystemHaltedError,
)


def make_context(topic: str = "topic-1") -> ContextBundle:
    return ContextBundle(topic_id=topic, topic_content=f"What should the council do about {topic}?")


def make_requests(
    n: int, context: ContextBundle | None = None, prefix: str = "archon"
) -> list[AgentRequest]:
    ctx = context or make_context()
    return [AgentRequest(agent_id=f"{prefix}-{i + 1}", context=ctx) for i in range(n)]


@dataclass(frozen=True)
class Step:
    """What one scripted agent does: wait ``latency`` seconds, then ``action``."""

    latency: float = 0.0
    action: str = "ok"  # ok | error | invalid | wrong_agent | keyboard_interrupt | forever


class ScriptedOrchestrator:
    """A trio orchestrator whose every agent follows a script; records what happened."""

    def __init__(self, plan: Mapping[str, Step] | None = None, default: Step = Step()) -> None:
        self.plan = dict(plan or {})
        self.default = default
        self.in_flight = 0
        self.max_in_flight = 0
        self.starts: list[tuple[str, float]] = []
        self.finishes: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.on_start: Callable[[str], None] | None = None

    @property
    def invoked(self) -> list[str]:
        return [a for a, _ in self.starts]

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        step = self.plan.get(agent_id, self.default)
        self.starts.append((agent_id, trio.current_time()))
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if self.on_start is not None:
            self.on_start(agent_id)
        try:
            if step.action == "forever" or math.isinf(step.latency):
                await trio.sleep_forever()
            await trio.sleep(step.latency)
            self.finishes.append((agent_id, trio.current_time()))
            if step.action == "error":
                raise RuntimeError(f"scripted failure of {agent_id}")
            if step.action == "keyboard_interrupt":
                raise KeyboardInterrupt
            if step.action == "invalid":
                return "not an output"  # type: ignore[return-value]
            owner = "someone-else" if step.action == "wrong_agent" else agent_id
            return AgentOutput(
                agent_id=owner,
                request_id=uuid4(),
                content=f"{agent_id} says yes on {context.topic_id}",
            )
        except trio.Cancelled:
            self.cancelled.append(agent_id)
            raise
        finally:
            self.in_flight -= 1


async def expect_halt(
    call: Callable[[], Awaitable[object]], trigger: Callable[[], Awaitable[None]]
) -> SystemHaltedError:
    """Run ``call`` while ``trigger`` runs beside it; return the SystemHaltedError it raised."""
    caught: list[SystemHaltedError] = []

    async def run_call(cancel_scope: trio.CancelScope) -> None:
        try:
            await call()
        except SystemHaltedError as exc:
            caught.append(exc)
        cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trigger)
        nursery.start_soon(run_call, nursery.cancel_scope)
    if not caught:
        raise AssertionError("expected SystemHaltedError, the call returned")
    return caught[0]


async def time_halt(
    call: Callable[[], Awaitable[object]],
    switch: HaltSwitch,
    when: Callable[[], Awaitable[None]],
    reason: str = "operator: stop",
) -> tuple[SystemHaltedError, float]:
    """Halt ``switch`` once ``when`` returns, while ``call`` runs.  Returns the
    SystemHaltedError ``call`` raised and the wall-clock seconds from the halt until
    ``call`` returned (for real threads and sockets, where no virtual clock runs)."""
    timing: dict[str, float] = {}

    async def timed_call() -> None:
        try:
            await call()
        finally:
            timing["returned"] = time.perf_counter()

    async def trigger() -> None:
        await when()
        timing["halt"] = time.perf_counter()
        switch.halt(reason)

    err = await expect_halt(timed_call, trigger)
    return err, timing["returned"] - timing["halt"]


def run_with_halt_at(
    batch: Callable[[], Awaitable[ConcurrentResult]], switch: HaltSwitch, halt_at_ms: float | None
) -> tuple[ConcurrentResult, bool, float]:
    """Run ``batch`` in a fresh ``trio.run`` on a jumping MockClock, halting ``switch``
    once ``halt_at_ms`` virtual milliseconds have passed (None: no timed halt).

    Returns the result (a halt's partial result if the batch raised SystemHaltedError),
    whether it was halted, and the virtual seconds the batch took.
    """
    box: list[tuple[ConcurrentResult, bool, float]] = []

    async def main() -> None:
        async def halter() -> None:
            assert halt_at_ms is not None
            await trio.sleep(halt_at_ms / 1000.0)
            switch.halt("halt at a random time")

        async with trio.open_nursery() as nursery:
            if halt_at_ms is not None:
                nursery.start_soon(halter)
            t0 = trio.current_time()
            try:
                result, halted = await batch(), False
            except SystemHaltedError as exc:
                assert exc.partial is not None
                result, halted = exc.partial, True
            box.append((result, halted, trio.current_time() - t0))
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return box[0]


def assert_one_outcome_per_request_in_order(
    requests: list[AgentRequest], result: ConcurrentResult
) -> None:
    """Every request has exactly one outcome, and outputs and failures keep request order."""
    index = {r.agent_id: i for i, r in enumerate(requests)}
    out_idx = [index[o.agent_id] for o in result.outputs]
    fail_idx = [index[f.agent_id] for f in result.failures]
    assert out_idx == sorted(out_idx) and fail_idx == sorted(fail_idx)
    assert sorted(out_idx + fail_idx) == list(range(len(requests)))


def client_bytes() -> int:
    """What this process holds in traced Python objects (``tracemalloc`` must be on),
    the in-process fake server's left out: what it reads (asyncio streams; the clients'
    HTTP stacks do not use them), decodes (json) and keeps (fake_openai.py)."""
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [
            tracemalloc.Filter(False, "*fake_openai.py"),
            tracemalloc.Filter(False, "*/asyncio/streams.py"),
            tracemalloc.Filter(False, "*/json/decoder.py"),
            tracemalloc.Filter(False, tracemalloc.__file__),
        ]
    )
    return sum(stat.size for stat in snapshot.statistics("filename"))


class PeakRss:
    """The growth of this process's resident memory over a block, at its peak.

    The kernel's own peak (``ru_maxrss``) when the block set a new one; else (an earlier
    test peaked higher) the highest of samples taken every 5 ms by a thread.
    """

    def __init__(self) -> None:
        self.growth_mb = 0.0
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> PeakRss:
        self._base = _rss_bytes()
        self._max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._sampler = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak = max_after if max_after > self._max_before else max(self._sampled, _rss_bytes())
        self.growth_mb = max(0, peak - self._base) / 2**20


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def rate_limit_report(**headers: str) -> RateLimitHeaders:
    """Rate-limit headers as a response would carry them (``x_ratelimit_limit_requests=``
    for ``x-ratelimit-limit-requests``), parsed."""
    return RateLimitHeaders.parse({k.replace("_", "-"): v for k, v in headers.items()})
