"""How soon a halt ends a batch in flight: on the stub, and through the bridge and the
openai SDK with every HTTP request open."""

from __future__ import annotations

import asyncio
import gc
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from functools import partial

import trio

from adapters.stub import AgentOrchestratorStub
from benchmarks.baselines.reference_asyncio import AsyncioStub, ReferenceService
from benchmarks.processes import fake_server
from benchmarks.results import Results, Row, Settings
from benchmarks.workloads import requests_for
from kernel import (
    AgentOrchestratorProtocol,
    AgentPool,
    ConcurrentDeliberationService,
    HaltSwitch,
    SystemHaltedError,
    nearest_rank,
)

__all__ = ["bridge_halt", "halt"]

#: (when ``halt()`` was called, when ``SystemHaltedError`` reached the caller), perf_counter.
Span = tuple[float, float]


def halt(s: Settings, results: Results) -> None:
    """72 agents in flight (they would take 10 minutes); halt; time until the caller has
    ``SystemHaltedError`` with the pool empty.  With and without the ``gc.freeze()`` an
    application can call after start-up, and against the reference, which cannot halt."""
    trials = 50 if s.quick else 200
    name = "halt (72 in flight)"
    for freeze in (False, True):
        with _gen2_collections() as collections:
            spans = trio.run(_halts_on_the_stub, trials, freeze)
        ms = [(done - halted) * 1e3 for halted, done in spans]
        paused = sum(any(a <= t <= b for t in collections) for a, b in spans)
        p50, p99 = statistics.median(ms), nearest_rank(ms, 0.99)
        variant = "kernel, app calls gc.freeze()" if freeze else "kernel"
        metric = "halt -> SystemHaltedError"
        note = f"{trials} trials, pool empty every time"
        results.add(Row(name, variant, f"{metric} p50", "ms", [p50], note=note))
        note = f"max {max(ms):.1f} ms; {paused} trial(s) hit a gen-2 GC pause"
        results.add(Row(name, variant, f"{metric} p99", "ms", [p99], "<= 5 ms", note))
    reference = [asyncio.run(_reference_halt_ms()) for _ in range(3)]
    note = "cannot halt mid-flight: runs the 100 ms batch to completion"
    results.add(Row(name, "reference", "halt -> batch returns", "ms", reference, note=note))


def bridge_halt(s: Settings, results: Results) -> None:
    """Halt with 72 chat completions open through the bridge against a server that never
    answers: time until SystemHaltedError, every HTTP request cancelled, pool empty."""
    trials = 10 if s.quick else 30
    with fake_server("--hang") as base_url:
        spans = trio.run(_halts_through_the_bridge, base_url, trials)
    ms = [(done - halted) * 1e3 for halted, done in spans]
    note = f"72 open HTTP requests cancelled, {trials} trials"
    name = "halt via bridge + openai"
    results.add(Row(name, "kernel", "halt -> SystemHaltedError", "ms", ms, note=note))


async def _halts_on_the_stub(trials: int, freeze: bool) -> list[Span]:
    stub = AgentOrchestratorStub(latency_ms=600_000.0)
    pool = AgentPool()
    spans = []
    for i in range(5 + trials):  # 5 to warm up
        if freeze and i == 5:
            gc.collect()
            gc.freeze()
        span = await _halt_mid_batch(stub, pool, ready=partial(_all_in_flight, stub, 72))
        if pool.active_count or stub.in_flight:
            raise RuntimeError("agents left running after a halt")
        if i >= 5:
            spans.append(span)
    gc.unfreeze()
    return spans


async def _halts_through_the_bridge(base_url: str, trials: int) -> list[Span]:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    pool = AgentPool()
    spans = []
    orchestrator = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=600)
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        for _ in range(2 + trials):  # 2 to warm up
            # 0.3 s: all 72 requests sent and waiting for the server.
            spans.append(await _halt_mid_batch(bridge, pool, ready=partial(trio.sleep, 0.3)))
            if pool.active_count:
                raise RuntimeError("agents left in the pool after a halt")
    return spans[2:]


async def _halt_mid_batch(
    orchestrator: AgentOrchestratorProtocol,
    pool: AgentPool,
    *,
    ready: Callable[[], Awaitable[object]],
) -> Span:
    """Run a 72-agent batch on a fresh halt switch and halt it once ``ready()`` returns."""
    switch = HaltSwitch()
    service = ConcurrentDeliberationService(orchestrator, switch, pool)
    halted_at = math.nan

    async def halter() -> None:
        nonlocal halted_at
        await ready()
        halted_at = time.perf_counter()
        switch.halt("benchmark")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(halter)
        try:
            await service.invoke_concurrent(requests_for(72))
        except SystemHaltedError:
            return halted_at, time.perf_counter()
    raise RuntimeError("the batch finished before the halt")


async def _all_in_flight(stub: AgentOrchestratorStub, n: int) -> None:
    while stub.in_flight < n:
        await trio.lowlevel.checkpoint()


@contextmanager
def _gen2_collections() -> Iterator[list[float]]:
    """The perf_counter times at which a generation-2 collection started, while in the block."""
    started: list[float] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            started.append(time.perf_counter())

    gc.callbacks.append(on_gc)
    try:
        yield started
    finally:
        gc.callbacks.remove(on_gc)


async def _reference_halt_ms() -> float:
    service = ReferenceService(AsyncioStub(100.0))
    task = asyncio.ensure_future(service.invoke_concurrent(requests_for(72)))
    await asyncio.sleep(0.010)
    t0 = time.perf_counter()
    service.halted = True  # the reference only looks at this before a batch
    await task
    return (time.perf_counter() - t0) * 1e3
