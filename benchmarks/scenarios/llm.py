"""The way to a real LLM: the asyncio bridge, the openai SDK over loopback HTTP, and how
long the first batch of a fresh process blocks the trio loop.

The adapters that need the ``llm`` extra are imported when a scenario runs, not at the top:
loaded earlier, openai's modules would sit in the heap that the halt scenario's gen-2
collections scan.
"""

from __future__ import annotations

import asyncio
import statistics

import trio

from adapters.stub import AgentOrchestratorStub
from benchmarks.baselines.reference_asyncio import AsyncioStub
from benchmarks.processes import fake_server, loop_stall_probe
from benchmarks.results import Results, Row, Settings
from benchmarks.timing import over, timed
from benchmarks.workloads import ServiceBatch, requests_for
from kernel import AgentOrchestratorProtocol, ConcurrentDeliberationService, HaltSwitch

__all__ = ["bridge", "first_batch_stall", "llm_loopback"]


def bridge(s: Settings, results: Results) -> None:
    """One call to a stub that answers at once, direct (trio) against through the bridge
    (asyncio); and the cost per agent of a 72-agent batch through the bridge."""
    calls = 1000 if s.quick else 3000
    direct = [trio.run(_direct_call_us, calls) for _ in range(s.reps)]
    bridged = [trio.run(_bridged_call_us, calls) for _ in range(s.reps)]
    batch = [trio.run(_bridged_batch_us) for _ in range(s.reps)]
    overhead = [b - d for b, d in zip(bridged, direct, strict=True)]
    name, metric = "bridge", "per call"
    results.add(Row(name, "trio stub (direct)", metric, "us", direct))
    results.add(Row(name, "asyncio stub via bridge", metric, "us", bridged))
    results.add(Row(name, "bridge overhead", metric, "us", overhead, target="<= 300 us"))
    results.add(Row(name, "72-agent batch via bridge", "cost per agent", "us", batch))


def llm_loopback(s: Settings, results: Results) -> None:
    """72 chat completions at 50 ms through kernel + bridge + openai, against the plain SDK
    under ``asyncio.gather``; the server is the loopback one, in a process of its own."""
    reps = max(3, s.reps)
    with fake_server("--latency", "0.05") as base_url:
        k = trio.run(_kernel_batches, base_url, reps)
        r = asyncio.run(_sdk_batches(base_url, reps))
    name, metric, ideal = "llm-loopback 72 @50 ms", "elapsed/ideal", 0.050
    results.add(Row(name, "kernel + bridge + openai", metric, "x", over(k, ideal)))
    note = "plain SDK, no kernel"
    results.add(Row(name, "asyncio.gather + openai", metric, "x", over(r, ideal), note=note))


def first_batch_stall(s: Settings, results: Results) -> None:
    """The longest the trio loop is blocked during the first 72-agent LLM batch of a fresh
    process, against later batches: a 1 ms heartbeat task over loopback, after
    ``gc.freeze()`` (tests/support/loop_stall_probe.py, one fresh interpreter per trial).  The
    "lazy" variant skips the orchestrator's ``aopen``: the client is built on the first
    request, on the loop, as before set-up moved to the bridge's entry."""
    trials = 3 if s.quick else 7
    name = "first-batch loop stall"
    for lazy in (False, True):
        args = ["--batches", "4", *(["--lazy"] if lazy else [])]
        reports = [loop_stall_probe(*args) for _ in range(trials)]
        if lazy:
            variant, target = "clients built on first request (before)", ""
        else:
            variant, target = "clients built on entry, in a thread (aopen)", "< 40 ms"
        first = [r["first_max_gap_ms"] for r in reports]
        later = [r["later_max_gap_ms"] for r in reports]
        note = f"{trials} fresh processes, gc.freeze() after set-up"
        metric = "max heartbeat gap"
        results.add(Row(name, variant, f"{metric}, first batch", "ms", first, target, note))
        results.add(Row(name, variant, f"{metric}, batches 2-4", "ms", later))
        if not lazy:
            entry = [r["entry_max_gap_ms"] for r in reports]
            entry_ms = statistics.median(r["entry_ms"] for r in reports)
            note = f"entering takes ~{entry_ms:.0f} ms, the loop runs meanwhile"
            results.add(
                Row(name, variant, f"{metric}, entering the bridge", "ms", entry, note=note)
            )


async def _per_call_us(orchestrator: AgentOrchestratorProtocol, calls: int) -> float:
    context = requests_for(1)[0].context
    times = await timed(lambda: orchestrator.invoke("a", context), calls, warmup=100)
    return sum(times) / calls * 1e6


async def _direct_call_us(calls: int) -> float:
    return await _per_call_us(AgentOrchestratorStub(latency_ms=0.0), calls)


async def _bridged_call_us(calls: int) -> float:
    from adapters.llm.bridge import AsyncioOrchestratorBridge

    async with AsyncioOrchestratorBridge(AsyncioStub(0.0)) as bridge:
        return await _per_call_us(bridge, calls)


async def _bridged_batch_us() -> float:
    from adapters.llm.bridge import AsyncioOrchestratorBridge

    async with AsyncioOrchestratorBridge(AsyncioStub(0.0)) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch())
        (seconds,) = await timed(ServiceBatch(service, 72, repeat=20), 1, warmup=1)
        return seconds / (20 * 72) * 1e6


async def _kernel_batches(base_url: str, reps: int) -> list[float]:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    orchestrator = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=30)
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch())
        return await timed(ServiceBatch(service, 72), reps, warmup=1)


async def _sdk_batches(base_url: str, reps: int) -> list[float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
    semaphore = asyncio.Semaphore(72)

    async def one(i: int) -> None:
        async with semaphore:
            await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "motion"}],
                extra_headers={"X-Conclave-Agent": f"archon-{i}"},
            )

    async def batch() -> None:
        await asyncio.gather(*(one(i) for i in range(72)))

    try:
        return await timed(batch, reps, warmup=1)
    finally:
        await client.close()
