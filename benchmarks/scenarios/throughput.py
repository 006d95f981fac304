"""How fast batches go: the kernel against a bare trio nursery and the asyncio reference."""

from __future__ import annotations

import math

from adapters.stub import AgentOrchestratorStub
from benchmarks.results import Results, Row, Settings
from benchmarks.timing import asyncio_times, ms, over, peak_bytes, trio_times
from benchmarks.workloads import BareBatch, KernelBatch, ReferenceBatch, requests_for
from kernel import ConcurrentDeliberationService

__all__ = ["full_council", "overhead", "queue", "scale", "seed_timing"]


def seed_timing(s: Settings, results: Results) -> None:
    """10 agents at 10 ms: concurrent against sequential, as the reference reported it."""
    reps = s.reps * 2
    conc = trio_times(KernelBatch(10, 10.0), reps, s.warmup)
    service = ConcurrentDeliberationService(AgentOrchestratorStub(latency_ms=10.0))
    requests = requests_for(10)
    seq = trio_times(lambda: service.invoke_sequential(requests), reps, s.warmup)
    ref = asyncio_times(ReferenceBatch(10, 10.0), reps, s.warmup)
    name = "seed-timing"
    target = "< 80 ms (reference reported)"
    results.add(Row(name, "kernel concurrent", "elapsed", "ms", ms(conc), target=target))
    results.add(Row(name, "kernel sequential", "elapsed", "ms", ms(seq)))
    speedup = [a / b for a, b in zip(seq, conc, strict=True)]
    target = "about 6x (reference)"
    results.add(Row(name, "kernel", "speedup vs sequential", "x", speedup, target=target))
    results.add(Row(name, "reference", "elapsed", "ms", ms(ref)))


def full_council(s: Settings, results: Results) -> None:
    """72 agents, once at 10 ms and once at 100 ms each: elapsed against the latency."""
    for latency in (10.0, 100.0):
        reps = s.reps if latency == 100.0 else s.reps * 2
        ideal = latency / 1000.0
        k = trio_times(KernelBatch(72, latency), reps, s.warmup)
        b = trio_times(BareBatch(72, latency), reps, s.warmup)
        r = asyncio_times(ReferenceBatch(72, latency), reps, s.warmup)
        name = f"full-council {latency:g} ms"
        target = "<= 1.05" if latency == 100.0 else ""
        results.add(Row(name, "kernel", "elapsed/ideal", "x", over(k, ideal), target=target))
        results.add(Row(name, "bare-trio", "elapsed/ideal", "x", over(b, ideal)))
        results.add(Row(name, "reference", "elapsed/ideal", "x", over(r, ideal)))


def overhead(s: Settings, results: Results) -> None:
    """Cost per agent of agents that do nothing: the machinery alone.

    The three are interleaved rep by rep, so that machine noise hits all alike.
    """
    repeat = 20 if s.quick else 50
    agents = 72 * repeat
    k: list[float] = []
    b: list[float] = []
    r: list[float] = []
    for _ in range(s.reps):
        k += trio_times(KernelBatch(72, 0.0, repeat=repeat), 1, s.warmup)
        b += trio_times(BareBatch(72, 0.0, repeat=repeat), 1, s.warmup)
        r += asyncio_times(ReferenceBatch(72, 0.0, repeat=repeat), 1, s.warmup)
    name, metric = "overhead", "cost per agent"
    one_us_each = agents / 1e6  # seconds per batch at 1 us per agent
    results.add(Row(name, "kernel", metric, "us", over(k, one_us_each)))
    results.add(Row(name, "bare-trio", metric, "us", over(b, one_us_each)))
    results.add(Row(name, "reference", metric, "us", over(r, one_us_each)))
    to_bare = [x / y for x, y in zip(k, b, strict=True)]
    to_reference = [x / y for x, y in zip(k, r, strict=True)]
    results.add(Row(name, "kernel / bare-trio", "ratio", "x", to_bare, target="<= 2x"))
    results.add(Row(name, "kernel / reference", "ratio", "x", to_reference))


def queue(s: Settings, results: Results) -> None:
    """1,000 agents through 72 slots (overflow="queue"): elapsed against ceil(n/72) rounds."""
    n, latency = 1000, 10.0
    ideal = math.ceil(n / 72) * latency / 1000.0
    kernel = KernelBatch(n, latency, overflow="queue")
    k = trio_times(kernel, s.reps, s.warmup)
    b = trio_times(BareBatch(n, latency), s.reps, s.warmup)
    r = asyncio_times(ReferenceBatch(n, latency, admit=False), s.reps, s.warmup)
    name = "queue 1000 @72"
    note = f"max in flight {kernel.stub.max_in_flight}"
    results.add(Row(name, "kernel", "elapsed/ideal", "x", over(k, ideal), "<= 1.10", note))
    results.add(Row(name, "bare-trio", "elapsed/ideal", "x", over(b, ideal)))
    note = "semaphore queue, no admission"
    results.add(Row(name, "reference", "elapsed/ideal", "x", over(r, ideal), note=note))


def scale(s: Settings, results: Results) -> None:
    """10,000 agents at once (capacity 10,000): elapsed, and peak memory per agent."""
    n, latency = 10_000, 100.0
    ideal = latency / 1000.0
    reps = max(3, s.reps // 2)
    k = trio_times(KernelBatch(n, latency, capacity=n), reps, 1)
    b = trio_times(BareBatch(n, latency, capacity=n), reps, 1)
    r = asyncio_times(ReferenceBatch(n, latency, capacity=n), reps, 1)
    kmem = peak_bytes(lambda: trio_times(KernelBatch(n, latency, capacity=n), 1, 0))
    bmem = peak_bytes(lambda: trio_times(BareBatch(n, latency, capacity=n), 1, 0))
    rmem = peak_bytes(lambda: asyncio_times(ReferenceBatch(n, latency, capacity=n), 1, 0))
    name, memory = "scale 10k", "peak memory per agent"
    results.add(Row(name, "kernel", "elapsed/ideal", "x", over(k, ideal), target="<= 1.5"))
    results.add(Row(name, "bare-trio", "elapsed/ideal", "x", over(b, ideal)))
    results.add(Row(name, "reference", "elapsed/ideal", "x", over(r, ideal)))
    note = "tracemalloc, incl. requests and outputs"
    results.add(Row(name, "kernel", memory, "KB", [kmem / n / 1024], "<= 10 KB", note))
    results.add(Row(name, "bare-trio", memory, "KB", [bmem / n / 1024]))
    results.add(Row(name, "reference", memory, "KB", [rmem / n / 1024]))
