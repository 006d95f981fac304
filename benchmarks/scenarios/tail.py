"""Tail control under heavy-tailed LLM latency: batch p50/p95/p99 and extra calls.

Every variant runs the same number of 72-agent batches on the stub's heavy-tailed profile
(:class:`adapters.stub.LatencyModel`: lognormal, median 800 ms, sigma 0.9, 0.5% of calls
stall for 30 s).  Seeds are per batch, the same for every variant.

The kernel variants run on trio's virtual clock (``MockClock``, autojump): the model's
latencies exactly, in a fraction of a second, whatever else the machine is doing.  In real
time, even scaled down 200-fold, a 50 ms scheduling hiccup on this shared 2-core machine
reads as a 10 s batch and swamps what is measured; the kernel's own CPU cost is measured by
the other scenarios.  The reference design (``asyncio.gather`` under a semaphore: a batch
waits for its slowest agent) has no virtual clock: it runs in real time, scaled by
``SCALE``, and is reported scaled back.  Variants: the reference, the kernel plain, with
``hedge`` at the observed p95 (budget 0.1), with ``quorum=65``, and with a ``deadline``.
"""

from __future__ import annotations

import asyncio
import random
from typing import TYPE_CHECKING

import attrs
import trio
import trio.testing

from adapters.stub import AgentOrchestratorStub, LatencyModel
from benchmarks.results import Results, Row, Settings
from benchmarks.workloads import requests_for
from kernel import (
    AgentOutput,
    ConcurrentDeliberationService,
    ContextBundle,
    HedgePolicy,
    nearest_rank,
)

if TYPE_CHECKING:
    from tests.support.fake_openai import FakeOpenAIServer

__all__ = ["tail", "tail_http"]

SCALE = 0.005  # the reference, in real time: 800 ms -> 4 ms; a 30 s stall -> 150 ms
AGENTS = 72
DEADLINE_S = 10.0  # unscaled: 12.5x the median
QUORUM = 65
WARMUP = 5  # batches before the timed ones: the observed p95 needs samples


def tail(s: Settings, results: Results) -> None:
    """200 batches x 72 agents (40 with --quick) per variant; p50/p95/p99 of batch time
    and the fraction of extra calls."""
    batches = 40 if s.quick else 200
    name = f"tail {batches} x {AGENTS}"
    runs = {
        "reference": (asyncio.run(_reference(batches)), 0.0),
        "kernel": _virtual(batches, {}),
        "kernel, hedge auto p95, budget 0.1": _virtual(batches, {"hedge": HedgePolicy(budget=0.1)}),
        f"kernel, quorum={QUORUM}": _virtual(batches, {"quorum": QUORUM}),
        f"kernel, deadline={DEADLINE_S:g} s": _virtual(batches, {"deadline": DEADLINE_S}),
    }
    plain_p99 = nearest_rank(runs["kernel"][0], 0.99)
    for variant, (times, extra) in runs.items():
        p99 = nearest_rank(times, 0.99)
        for q in (0.5, 0.95, 0.99):
            target = ""
            if q == 0.99 and "hedge" in variant:
                target = f"<= 0.6x plain ({0.6 * plain_p99:.1f} s)"
            results.add(
                Row(
                    name, variant, f"batch p{round(q * 100)}", "s", [nearest_rank(times, q)], target
                )
            )
        note = f"p99 {p99 / plain_p99:.2f}x plain" if variant != "kernel" else ""
        target = "<= 10%" if "hedge" in variant else ""
        results.add(Row(name, variant, "extra calls", "%", [extra * 100.0], target, note))


class _Reseeded:
    """The heavy-tailed stub, re-seeded per batch, so every variant sees the same draws
    while one service keeps its latency history across batches."""

    def __init__(self) -> None:
        self.stub = AgentOrchestratorStub()

    def seed(self, seed: int) -> None:
        self.stub = AgentOrchestratorStub(latency_profile="lognormal", seed=seed)

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        return await self.stub.invoke(agent_id, context)


def _virtual(batches: int, tail_control: dict[str, object]) -> tuple[list[float], float]:
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_kernel, batches, tail_control, clock=clock)


async def _kernel(batches: int, tail_control: dict[str, object]) -> tuple[list[float], float]:
    """Batch times (s, virtual) and extra calls per agent call of one kernel variant."""
    orchestrator = _Reseeded()
    service = ConcurrentDeliberationService(orchestrator)
    times = []
    for i in range(-WARMUP, batches):
        orchestrator.seed(i)
        t0 = trio.current_time()
        await service.invoke_concurrent(requests_for(AGENTS), **tail_control)  # type: ignore[arg-type]
        if i >= 0:
            times.append(trio.current_time() - t0)
    snap = service.metrics.snapshot()
    calls = snap.agent_invocations_total
    return times, snap.hedges_launched / calls if calls else 0.0


async def _reference(batches: int) -> list[float]:
    """The reference design's batch times: every agent, then wait for the slowest."""
    model = LatencyModel()
    semaphore = asyncio.Semaphore(AGENTS)
    loop = asyncio.get_running_loop()

    async def agent(rng: random.Random) -> None:
        async with semaphore:
            await asyncio.sleep(model.sample_ms(rng) * SCALE / 1000.0)

    times = []
    for i in range(batches):
        rng = random.Random(i)
        t0 = loop.time()
        await asyncio.gather(*(agent(rng) for _ in range(AGENTS)))
        times.append((loop.time() - t0) / SCALE)
    return times


HTTP_SCALE = 0.1  # over HTTP, in real time: 800 ms -> 80 ms; a 30 s stall -> 3 s


def tail_http(s: Settings, results: Results) -> None:
    """The same through the bridge and the OpenAI adapter against the loopback server,
    whose answers take the model's latencies (time-scaled): plain against hedged (observed
    p95, budget 0.1); the server counts the losers' closed connections."""
    from tests.support.fake_openai import FakeOpenAIServer

    batches = 8 if s.quick else 30
    name = f"tail over HTTP {batches} x {AGENTS}"
    server = FakeOpenAIServer().start()
    try:
        plain = trio.run(_http, server, batches, None)
        hedged = trio.run(_http, server, batches, HedgePolicy(budget=0.1))
    finally:
        server.stop()
    plain_p99 = nearest_rank(plain.times, 0.99)
    for variant, run in (("kernel + bridge + openai", plain), ("... + hedge auto p95", hedged)):
        for q in (0.5, 0.99):
            target = "<= 0.6x plain" if q == 0.99 and run is hedged else ""
            value = nearest_rank(run.times, q)
            note = f"{value / plain_p99:.2f}x plain" if q == 0.99 and run is hedged else ""
            results.add(Row(name, variant, f"batch p{round(q * 100)}", "s", [value], target, note))
        note = (
            f"{run.hedges} hedges: {run.closed} losers' requests closed by the client, "
            f"{run.late} answered before the cancel reached them"
        )
        results.add(Row(name, variant, "extra calls", "%", [run.extra * 100], "", note))


@attrs.frozen
class _HttpRun:
    times: list[float]  # unscaled seconds
    hedges: int  # in the timed batches
    closed: int  # requests the server saw abandoned by the client
    late: int  # losers the server answered before their cancel arrived
    extra: float  # hedges per agent


async def _http(server: FakeOpenAIServer, batches: int, hedge: HedgePolicy | None) -> _HttpRun:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    model = LatencyModel()
    requests = requests_for(AGENTS)
    orchestrator = OpenAIChatOrchestrator(server.base_url, "fake-model", timeout_s=60)
    times, closed, late, hedges_before = [], 0, 0, 0
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge)
        for i in range(-WARMUP, batches):
            server.reset()
            rng = random.Random(i)
            for req in requests:  # the first call's latency, then the duplicate's
                latencies = (model.sample_ms(rng), model.sample_ms(rng))
                server.script(
                    req.agent_id, *(("latency", ms * HTTP_SCALE / 1e3) for ms in latencies)
                )
            t0 = trio.current_time()
            await service.invoke_concurrent(requests, hedge=hedge)
            if i >= 0:
                times.append((trio.current_time() - t0) / HTTP_SCALE)
                batch_closed, batch_answered = await trio.to_thread.run_sync(_settled, server)
                closed += batch_closed
                late += batch_answered - AGENTS
    hedges = service.metrics.snapshot().hedges_launched - hedges_before
    return _HttpRun(times, hedges, closed, late, hedges / (batches * AGENTS))


def _settled(server: FakeOpenAIServer) -> tuple[int, int]:
    """The last batch's abandoned and answered requests, once the server saw them all end."""
    server.wait_for(lambda srv: srv.in_flight == 0, timeout=5.0)
    return server.disconnects, server.answered
