"""The way to a real LLM: the asyncio bridge, the openai SDK over loopback HTTP, and how
long the first batch of a fresh process blocks the trio loop.

The adapters that need the ``llm`` extra are imported when a scenario runs, not at the top:
loaded earlier, openai's modules would sit in the heap that the halt scenario's gen-2
collections scan.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from adapters.stub import AgentOrchestratorStub
from benchmarks.baselines.reference_asyncio import AsyncioStub
from benchmarks.processes import fake_server, loop_stall_probe
from benchmarks.results import Results, Row, Settings
from benchmarks.timing import over, timed
from benchmarks.workloads import ServiceBatch, requests_for
from kernel import AgentOrchestratorProtocol, ConcurrentDeliberationService, HaltSwitch

__all__ = ["bridge", "first_batch_stall", "llm_call_cpu", "llm_loopback", "llm_stream"]

#: The streaming scenario's answer: 256 completion tokens, one chunk each, at 512 a second.
STREAM_TOKENS, STREAM_RATE = 256, 512.0


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


def llm_stream(s: Settings, results: Results) -> None:
    """CPU per agent of a 72-agent batch whose answers are 256 tokens, streamed (one chunk
    a token, as servers send them) against not streamed, through kernel + bridge +
    openai; and the longest the trio loop was blocked meanwhile (a 1 ms heartbeat).  The
    server generates each answer at 512 tokens a second, in a process of its own.  For
    reference, on the same server, streamed and not: the plain SDK (its own default
    client, no kernel, no bridge) and httpx2 alone, the floor of the HTTP stack."""
    reps = max(3, s.reps)
    name = f"llm-stream 72 x {STREAM_TOKENS} tokens"
    cpu: dict[bool, list[float]] = {}
    with fake_server("--generate", f"{STREAM_TOKENS}:{STREAM_RATE:g}") as base_url:
        for stream in (False, True):
            runs = trio.run(_stream_batches, base_url, stream, reps)
            cpu[stream] = [c for c, _ in runs]
            variant = "streamed (default)" if stream else "stream=False"
            results.add(Row(name, variant, "CPU per agent", "ms", cpu[stream]))
            gaps = [g for _, g in runs]
            target = "< 40 ms" if stream else ""
            results.add(Row(name, variant, "max heartbeat gap", "ms", gaps, target))
        # The references, under asyncio.gather against the same server, no kernel and no
        # bridge: the plain SDK (its own default client, a model object per chunk), and
        # httpx2 alone (the SDK's HTTP client, the body read to its end, not parsed): the
        # floor of the HTTP stack.
        for stream in (False, True):
            how = "streamed" if stream else "stream=False"
            sdk = asyncio.run(_bare_sdk_batches(base_url, "httpx", stream, reps))
            note = "plain SDK, no kernel"
            results.add(Row(name, f"plain SDK, {how}", "CPU per agent", "ms", sdk, note=note))
            raw = asyncio.run(_httpx_stream_batches(base_url, stream, reps))
            note = "the HTTP stack's floor: body read, not parsed"
            results.add(Row(name, f"httpx2 alone, {how}", "CPU per agent", "ms", raw, note=note))
    ratio = [a / b for a, b in zip(cpu[True], cpu[False], strict=True)]
    results.add(Row(name, "streamed / stream=False", "CPU per agent", "x", ratio, "<= 1.3x"))


def llm_call_cpu(s: Settings, results: Results) -> None:
    """CPU per call of a short chat completion answered at once, through kernel + bridge +
    orchestrator against the bare ``AsyncOpenAI`` (its own client of the same transport,
    ``asyncio.gather``, no kernel), streamed and not, on each transport installed: the
    kernel path's cost above the SDK's floor.  Batches of 72, one server process."""
    from adapters.llm.openai_chat import aiohttp_installed

    reps = max(5, s.reps)
    name = "llm-call CPU 72 agents"
    transports = ["httpx", *(["aiohttp"] if aiohttp_installed() else [])]
    with fake_server() as base_url:
        for transport in transports:
            for stream in (False, True):
                how = f"{transport}, {'streamed' if stream else 'stream=False'}"
                bare = asyncio.run(_bare_sdk_batches(base_url, transport, stream, reps))
                kernel = trio.run(_kernel_call_batches, base_url, transport, stream, reps)
                note = "AsyncOpenAI alone, asyncio.gather"
                results.add(Row(name, f"bare SDK, {how}", "CPU per call", "ms", bare, note=note))
                results.add(Row(name, f"kernel path, {how}", "CPU per call", "ms", kernel))
                ratio = [k / b for k, b in zip(sorted(kernel), sorted(bare), strict=True)]
                results.add(
                    Row(name, f"kernel / bare, {how}", "CPU per call", "x", ratio, "<= 1.15x")
                )


async def _bare_sdk_batches(base_url: str, transport: str, stream: bool, reps: int) -> list[float]:
    """CPU ms per call through ``AsyncOpenAI`` alone (for each of ``reps`` batches of 72): a
    whole answer, or the stream iterated to its end (usage in the last chunk)."""
    import openai

    http_client = openai.DefaultAioHttpClient() if transport == "aiohttp" else None
    client = openai.AsyncOpenAI(
        base_url=base_url, api_key="x", max_retries=0, timeout=60, http_client=http_client
    )
    messages: Any = [{"role": "user", "content": "motion"}]

    async def one(i: int) -> None:
        headers = {"X-Conclave-Agent": f"archon-{i}"}
        if not stream:
            await client.chat.completions.create(
                model="fake-model", messages=messages, extra_headers=headers
            )
            return
        chunks = await client.chat.completions.create(
            model="fake-model",
            messages=messages,
            extra_headers=headers,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in chunks:
            pass

    try:
        return await _asyncio_cpu_per_agent(one, reps)
    finally:
        await client.close()


async def _kernel_call_batches(
    base_url: str, transport: str, stream: bool, reps: int
) -> list[float]:
    """CPU ms per call through the kernel, the bridge and the orchestrator."""
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    orchestrator = OpenAIChatOrchestrator(
        base_url, "fake-model", timeout_s=60, stream=stream, transport=transport
    )
    runs: list[float] = []
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        batch = ServiceBatch(ConcurrentDeliberationService(bridge, HaltSwitch()), 72)
        await batch()  # warm-up: connections, first-call imports
        for _ in range(reps):
            cpu = time.process_time()
            await batch()
            runs.append((time.process_time() - cpu) / 72 * 1000.0)
    return runs


async def _stream_batches(base_url: str, stream: bool, reps: int) -> list[tuple[float, float]]:
    """(CPU ms per agent, max heartbeat gap ms) for each of ``reps`` batches of 72."""
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    orchestrator = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=60, stream=stream)
    runs: list[tuple[float, float]] = []
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch())
        batch = ServiceBatch(service, 72)
        await batch()  # warm-up: connections, first-call imports
        for _ in range(reps):
            gap = [0.0]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_heartbeat, gap)
                cpu = time.process_time()
                await batch()
                cpu = time.process_time() - cpu
                nursery.cancel_scope.cancel()
            runs.append((cpu / 72 * 1000.0, gap[0] * 1000.0))
    return runs


async def _httpx_stream_batches(base_url: str, stream: bool, reps: int) -> list[float]:
    """CPU ms per agent for each of ``reps`` batches of 72 through httpx2 alone (the SDK's
    HTTP client, with the SDK's connection limits): the request the SDK sends, the body
    read to its end and not parsed."""
    import httpx2

    body: dict[str, Any] = {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "motion"}],
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    limits = httpx2.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx2.AsyncClient(timeout=60, limits=limits) as client:

        async def one(i: int) -> None:
            headers = {"X-Conclave-Agent": f"archon-{i}"}
            url = f"{base_url}/chat/completions"
            async with client.stream("POST", url, json=body, headers=headers) as response:
                async for _ in response.aiter_bytes():
                    pass

        return await _asyncio_cpu_per_agent(one, reps)


async def _asyncio_cpu_per_agent(one: Callable[[int], Awaitable[None]], reps: int) -> list[float]:
    """CPU ms per agent for each of ``reps`` batches of ``one(0)`` ... ``one(71)`` under
    ``asyncio.gather``, after a batch to warm up (connections, first-call imports)."""

    async def batch() -> None:
        await asyncio.gather(*(one(i) for i in range(72)))

    await batch()
    runs: list[float] = []
    for _ in range(reps):
        cpu = time.process_time()
        await batch()
        runs.append((time.process_time() - cpu) / 72 * 1000.0)
    return runs


async def _heartbeat(gap: list[float]) -> None:
    """Wake every millisecond; keep the longest time between two wake-ups in ``gap``."""
    last = time.perf_counter()
    while True:
        await trio.sleep(0.001)
        now = time.perf_counter()
        gap[0] = max(gap[0], now - last)
        last = now


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
