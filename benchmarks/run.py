"""conclave-kernel benchmarks: the kernel and its baselines, side by side, in one run.

    python benchmarks/run.py [--quick] [--out DIR] [--only NAME ...] [--no-plot]

Each scenario warms up, repeats, and reports the median and the spread (min-max) of
the kernel *and* of its baselines measured in the same process, minutes apart at most,
so that ratios survive a noisy shared machine.  Writes ``results.json`` (with machine
info) and ``results.md`` to ``--out`` and prints the table.

Baselines (benchmarks/baselines/):
  reference  asyncio.gather + asyncio.Semaphore(72) + set pool + halt check at start only
  bare-trio  a trio nursery + CapacityLimiter, no kernel features (the floor for trio)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trio  # noqa: E402

from adapters.stub import AgentOrchestratorStub  # noqa: E402
from benchmarks.baselines import bare_trio  # noqa: E402
from benchmarks.baselines.reference_asyncio import AsyncioStub, ReferenceService  # noqa: E402
from kernel import (  # noqa: E402
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
    SystemHaltedError,
)

# ---------------------------------------------------------------- bookkeeping


@dataclass
class Row:
    scenario: str
    variant: str
    metric: str
    unit: str
    samples: list[float]
    note: str = ""
    target: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def low(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def high(self) -> float:
        return max(self.samples) if self.samples else math.nan


@dataclass
class Config:
    quick: bool
    reps: int
    warmup: int
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, *args: Any, **kwargs: Any) -> Row:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        return row


def requests_for(n: int, topic: str = "bench") -> list[AgentRequest]:
    context = ContextBundle(topic_id=topic, topic_content="Should the council adopt the motion?")
    return [AgentRequest(agent_id=f"archon-{i + 1}", context=context) for i in range(n)]


Setup = Callable[[], Awaitable[Callable[[], Awaitable[Any]]]]


async def _timed(setup: Setup, reps: int, warmup: int) -> list[float]:
    """Seconds per call of the batch function ``setup`` returns.

    Loop-agnostic (it only awaits what it is given), so trio and asyncio are timed by the
    very same code.
    """
    batch = await setup()
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        await batch()
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    return times


def trio_reps(setup: Setup, reps: int, warmup: int) -> list[float]:
    return trio.run(_timed, setup, reps, warmup)


def asyncio_reps(setup: Setup, reps: int, warmup: int) -> list[float]:
    return asyncio.run(_timed(setup, reps, warmup))


def kernel_setup(
    n: int, latency_ms: float, capacity: int = 72, overflow: str = "reject", batches: int = 1
) -> Setup:
    async def setup() -> Callable[[], Awaitable[Any]]:
        stub = AgentOrchestratorStub(latency_ms=latency_ms)
        service = ConcurrentDeliberationService(stub, HaltSwitch(), AgentPool(capacity))
        reqs = requests_for(n)

        async def batch() -> None:
            for _ in range(batches):
                result = await service.invoke_concurrent(reqs, overflow=overflow)  # type: ignore[arg-type]
                assert result.success_count == n

        batch.stub = stub  # type: ignore[attr-defined]
        return batch

    return setup


def bare_setup(n: int, latency_ms: float, capacity: int = 72, batches: int = 1) -> Setup:
    async def setup() -> Callable[[], Awaitable[Any]]:
        stub = AgentOrchestratorStub(latency_ms=latency_ms)
        limiter = trio.CapacityLimiter(capacity)
        reqs = requests_for(n)

        async def batch() -> None:
            for _ in range(batches):
                await bare_trio.run_batch(stub, reqs, limiter)

        return batch

    return setup


def reference_setup(
    n: int, latency_ms: float, capacity: int = 72, admit: bool = True, batches: int = 1
) -> Setup:
    async def setup() -> Callable[[], Awaitable[Any]]:
        service = ReferenceService(AsyncioStub(latency_ms), capacity, admit=admit)
        reqs = requests_for(n)

        async def batch() -> None:
            for _ in range(batches):
                result = await service.invoke_concurrent(reqs)
                assert result.success_count == n

        return batch

    return setup


# ---------------------------------------------------------------- scenarios


def seed_timing(cfg: Config) -> None:
    reps = cfg.reps * 2
    conc = trio_reps(kernel_setup(10, 10.0), reps, cfg.warmup)

    async def seq_setup() -> Callable[[], Awaitable[Any]]:
        service = ConcurrentDeliberationService(AgentOrchestratorStub(latency_ms=10.0))
        reqs = requests_for(10)
        return lambda: service.invoke_sequential(reqs)

    seq = trio_reps(seq_setup, reps, cfg.warmup)
    ref = asyncio_reps(reference_setup(10, 10.0), reps, cfg.warmup)
    cfg.add(
        "seed-timing",
        "kernel concurrent",
        "elapsed",
        "ms",
        [t * 1e3 for t in conc],
        target="< 80 ms (reference reported)",
    )
    cfg.add("seed-timing", "kernel sequential", "elapsed", "ms", [t * 1e3 for t in seq])
    cfg.add(
        "seed-timing",
        "kernel",
        "speedup vs sequential",
        "x",
        [s / c for s, c in zip(seq, conc, strict=True)],
        target="about 6x (reference)",
    )
    cfg.add("seed-timing", "reference", "elapsed", "ms", [t * 1e3 for t in ref])


def full_council(cfg: Config) -> None:
    for latency in (10.0, 100.0):
        reps = cfg.reps if latency == 100.0 else cfg.reps * 2
        ideal = latency / 1000.0
        k = trio_reps(kernel_setup(72, latency), reps, cfg.warmup)
        b = trio_reps(bare_setup(72, latency), reps, cfg.warmup)
        r = asyncio_reps(reference_setup(72, latency), reps, cfg.warmup)
        target = "<= 1.05" if latency == 100.0 else ""
        name = f"full-council {latency:g} ms"
        cfg.add(name, "kernel", "elapsed/ideal", "x", [t / ideal for t in k], target=target)
        cfg.add(name, "bare-trio", "elapsed/ideal", "x", [t / ideal for t in b])
        cfg.add(name, "reference", "elapsed/ideal", "x", [t / ideal for t in r])


def overhead(cfg: Config) -> None:
    batches = 20 if cfg.quick else 50
    per = 72 * batches
    # Interleave the three implementations rep by rep so that machine noise hits all alike.
    k: list[float] = []
    b: list[float] = []
    r: list[float] = []
    for _ in range(cfg.reps):
        k += trio_reps(kernel_setup(72, 0.0, batches=batches), 1, cfg.warmup)
        b += trio_reps(bare_setup(72, 0.0, batches=batches), 1, cfg.warmup)
        r += asyncio_reps(reference_setup(72, 0.0, batches=batches), 1, cfg.warmup)
    cfg.add("overhead", "kernel", "cost per agent", "us", [t / per * 1e6 for t in k])
    cfg.add("overhead", "bare-trio", "cost per agent", "us", [t / per * 1e6 for t in b])
    cfg.add("overhead", "reference", "cost per agent", "us", [t / per * 1e6 for t in r])
    cfg.add(
        "overhead",
        "kernel / bare-trio",
        "ratio",
        "x",
        [x / y for x, y in zip(k, b, strict=True)],
        target="<= 2x",
    )
    cfg.add(
        "overhead", "kernel / reference", "ratio", "x", [x / y for x, y in zip(k, r, strict=True)]
    )


def queue(cfg: Config) -> None:
    n, cap, latency = 1000, 72, 10.0
    ideal = math.ceil(n / cap) * latency / 1000.0
    in_flight: list[int] = []

    def kernel_q() -> Setup:
        inner = kernel_setup(n, latency, capacity=cap, overflow="queue")

        async def setup() -> Callable[[], Awaitable[Any]]:
            batch = await inner()

            async def run() -> None:
                await batch()
                in_flight.append(batch.stub.max_in_flight)  # type: ignore[attr-defined]

            return run

        return setup

    k = trio_reps(kernel_q(), cfg.reps, cfg.warmup)
    b = trio_reps(bare_setup(n, latency, capacity=cap), cfg.reps, cfg.warmup)
    r = asyncio_reps(reference_setup(n, latency, capacity=cap, admit=False), cfg.reps, cfg.warmup)
    cfg.add(
        "queue 1000 @72",
        "kernel",
        "elapsed/ideal",
        "x",
        [t / ideal for t in k],
        target="<= 1.10",
        note=f"max in flight {max(in_flight)}",
    )
    cfg.add("queue 1000 @72", "bare-trio", "elapsed/ideal", "x", [t / ideal for t in b])
    cfg.add(
        "queue 1000 @72",
        "reference",
        "elapsed/ideal",
        "x",
        [t / ideal for t in r],
        note="semaphore queue, no admission",
    )


def _peak_bytes(run: Callable[[], Any]) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def scale(cfg: Config) -> None:
    n, latency = 10_000, 100.0
    ideal = latency / 1000.0
    reps = max(3, cfg.reps // 2)
    k = trio_reps(kernel_setup(n, latency, capacity=n), reps, 1)
    b = trio_reps(bare_setup(n, latency, capacity=n), reps, 1)
    r = asyncio_reps(reference_setup(n, latency, capacity=n), reps, 1)
    kmem = _peak_bytes(lambda: trio_reps(kernel_setup(n, latency, capacity=n), 1, 0))
    bmem = _peak_bytes(lambda: trio_reps(bare_setup(n, latency, capacity=n), 1, 0))
    rmem = _peak_bytes(lambda: asyncio_reps(reference_setup(n, latency, capacity=n), 1, 0))
    cfg.add("scale 10k", "kernel", "elapsed/ideal", "x", [t / ideal for t in k], target="<= 1.5")
    cfg.add("scale 10k", "bare-trio", "elapsed/ideal", "x", [t / ideal for t in b])
    cfg.add("scale 10k", "reference", "elapsed/ideal", "x", [t / ideal for t in r])
    cfg.add(
        "scale 10k",
        "kernel",
        "peak memory per agent",
        "KB",
        [kmem / n / 1024],
        target="<= 10 KB",
        note="tracemalloc, incl. requests and outputs",
    )
    cfg.add("scale 10k", "bare-trio", "peak memory per agent", "KB", [bmem / n / 1024])
    cfg.add("scale 10k", "reference", "peak memory per agent", "KB", [rmem / n / 1024])


def halt(cfg: Config) -> None:
    trials = 50 if cfg.quick else 200
    gc_events: list[tuple[str, int, float]] = []

    def on_gc(phase: str, info: dict[str, int]) -> None:
        gc_events.append((phase, info["generation"], time.perf_counter()))

    async def main(freeze: bool) -> tuple[list[float], int]:
        stub = AgentOrchestratorStub(latency_ms=600_000.0)
        pool = AgentPool()
        out = []
        with_gc = 0
        for i in range(trials + 5):
            if freeze and i == 5:
                gc.collect()
                gc.freeze()  # what an embedding app can do after start-up
            switch = HaltSwitch()
            service = ConcurrentDeliberationService(stub, switch, pool)
            reqs = requests_for(72)
            mark: dict[str, float] = {}

            async def halter(switch: HaltSwitch = switch, mark: dict[str, float] = mark) -> None:
                while stub.in_flight < 72:
                    await trio.lowlevel.checkpoint()
                mark["halt"] = time.perf_counter()
                switch.halt("benchmark")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(halter)
                try:
                    await service.invoke_concurrent(reqs)
                except SystemHaltedError:
                    mark["done"] = time.perf_counter()
            assert pool.active_count == 0 and stub.in_flight == 0
            if i >= 5:
                out.append((mark["done"] - mark["halt"]) * 1e3)
                with_gc += any(
                    g == 2 and mark["halt"] <= t <= mark["done"] for _, g, t in gc_events
                )
        if freeze:
            gc.unfreeze()
        return out, with_gc

    gc.callbacks.append(on_gc)
    try:
        for freeze in (False, True):
            k, with_gc = trio.run(main, freeze)
            variant = "kernel, app calls gc.freeze()" if freeze else "kernel"
            p99 = sorted(k)[max(0, math.ceil(0.99 * len(k)) - 1)]
            cfg.add(
                "halt (72 in flight)",
                variant,
                "halt -> SystemHaltedError p50",
                "ms",
                [statistics.median(k)],
                note=f"{trials} trials, pool empty every time",
            )
            cfg.add(
                "halt (72 in flight)",
                variant,
                "halt -> SystemHaltedError p99",
                "ms",
                [p99],
                target="<= 5 ms",
                note=f"max {max(k):.1f} ms; {with_gc} trial(s) hit a gen-2 GC pause",
            )
    finally:
        gc.callbacks.remove(on_gc)

    async def reference_halt() -> float:
        service = ReferenceService(AsyncioStub(100.0))
        task = asyncio.ensure_future(service.invoke_concurrent(requests_for(72)))
        await asyncio.sleep(0.010)
        t0 = time.perf_counter()
        service.halted = True  # the reference only looks at this before a batch
        await task
        return (time.perf_counter() - t0) * 1e3

    ref = [asyncio.run(reference_halt()) for _ in range(3)]
    cfg.add(
        "halt (72 in flight)",
        "reference",
        "halt -> batch returns",
        "ms",
        ref,
        note="cannot halt mid-flight: runs the 100 ms batch to completion",
    )


def bridge(cfg: Config) -> None:
    from adapters.asyncio_bridge import AsyncioOrchestratorBridge

    calls = 1000 if cfg.quick else 3000
    ctx = requests_for(1)[0].context

    async def direct() -> float:
        stub = AgentOrchestratorStub(latency_ms=0.0)
        for _ in range(100):
            await stub.invoke("a", ctx)
        t0 = time.perf_counter()
        for _ in range(calls):
            await stub.invoke("a", ctx)
        return (time.perf_counter() - t0) / calls * 1e6

    async def bridged() -> float:
        async with AsyncioOrchestratorBridge(AsyncioStub(0.0)) as b:
            for _ in range(100):
                await b.invoke("a", ctx)
            t0 = time.perf_counter()
            for _ in range(calls):
                await b.invoke("a", ctx)
            return (time.perf_counter() - t0) / calls * 1e6

    d = [trio.run(direct) for _ in range(cfg.reps)]
    br = [trio.run(bridged) for _ in range(cfg.reps)]
    cfg.add("bridge", "trio stub (direct)", "per call", "us", d)
    cfg.add("bridge", "asyncio stub via bridge", "per call", "us", br)
    cfg.add(
        "bridge",
        "bridge overhead",
        "per call",
        "us",
        [x - y for x, y in zip(br, d, strict=True)],
        target="<= 300 us",
    )

    async def batch72() -> float:
        async with AsyncioOrchestratorBridge(AsyncioStub(0.0)) as b:
            service = ConcurrentDeliberationService(b, HaltSwitch())
            reqs = requests_for(72)
            for _ in range(5):
                await service.invoke_concurrent(reqs)
            t0 = time.perf_counter()
            for _ in range(20):
                await service.invoke_concurrent(reqs)
            return (time.perf_counter() - t0) / (20 * 72) * 1e6

    cfg.add(
        "bridge",
        "72-agent batch via bridge",
        "cost per agent",
        "us",
        [trio.run(batch72) for _ in range(cfg.reps)],
    )


def _fake_server(*args: str) -> tuple[subprocess.Popen[str], str]:
    """The loopback OpenAI-compatible test server, in a process of its own so that it does
    not compete with the client for the GIL (in the tests it is a thread)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_openai", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    return proc, f"http://127.0.0.1:{int(proc.stdout.readline())}/v1"


def bridge_halt(cfg: Config) -> None:
    """Halt with 72 chat completions open through the bridge against a server that never
    answers: time until SystemHaltedError, every HTTP request cancelled, pool empty."""
    from adapters.asyncio_bridge import AsyncioOrchestratorBridge
    from adapters.openai_chat import OpenAIChatOrchestrator

    trials = 10 if cfg.quick else 30
    proc, base_url = _fake_server("--hang")
    try:

        async def main() -> list[float]:
            orch = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=600)
            out = []
            async with AsyncioOrchestratorBridge(orch) as b:
                pool = AgentPool()
                for _ in range(trials + 2):
                    switch = HaltSwitch()
                    service = ConcurrentDeliberationService(b, switch, pool)
                    mark: dict[str, float] = {}

                    async def halter(
                        switch: HaltSwitch = switch, m: dict[str, float] = mark
                    ) -> None:
                        await trio.sleep(0.3)  # all 72 requests sent and waiting
                        m["halt"] = time.perf_counter()
                        switch.halt("benchmark")

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(halter)
                        try:
                            await service.invoke_concurrent(requests_for(72))
                        except SystemHaltedError:
                            mark["done"] = time.perf_counter()
                    assert pool.active_count == 0
                    out.append((mark["done"] - mark["halt"]) * 1e3)
            return out[2:]

        k = trio.run(main)
    finally:
        proc.kill()
        proc.wait()
    cfg.add(
        "halt via bridge + openai",
        "kernel",
        "halt -> SystemHaltedError",
        "ms",
        k,
        note=f"72 open HTTP requests cancelled, {trials} trials",
    )


def llm_loopback(cfg: Config) -> None:
    import openai

    from adapters.asyncio_bridge import AsyncioOrchestratorBridge
    from adapters.openai_chat import OpenAIChatOrchestrator

    proc, base_url = _fake_server("--latency", "0.05")
    ideal = 0.050
    reps = max(3, cfg.reps)
    try:

        async def kernel_run() -> list[float]:
            orch = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=30)
            async with AsyncioOrchestratorBridge(orch) as b:
                service = ConcurrentDeliberationService(b, HaltSwitch())
                reqs = requests_for(72)
                times = []
                for i in range(reps + 1):
                    t0 = time.perf_counter()
                    result = await service.invoke_concurrent(reqs)
                    assert result.success_count == 72, result.failures[:1]
                    if i:
                        times.append(time.perf_counter() - t0)
                return times

        async def reference_run() -> list[float]:
            client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)
            sem = asyncio.Semaphore(72)

            async def one(i: int) -> None:
                async with sem:
                    await client.chat.completions.create(
                        model="fake-model",
                        messages=[{"role": "user", "content": "motion"}],
                        extra_headers={"X-Conclave-Agent": f"archon-{i}"},
                    )

            times = []
            for i in range(reps + 1):
                t0 = time.perf_counter()
                await asyncio.gather(*(one(j) for j in range(72)))
                if i:
                    times.append(time.perf_counter() - t0)
            await client.close()
            return times

        k = trio.run(kernel_run)
        r = asyncio.run(reference_run())
    finally:
        proc.kill()
        proc.wait()
    cfg.add(
        "llm-loopback 72 @50 ms",
        "kernel + bridge + openai",
        "elapsed/ideal",
        "x",
        [t / ideal for t in k],
    )
    cfg.add(
        "llm-loopback 72 @50 ms",
        "asyncio.gather + openai",
        "elapsed/ideal",
        "x",
        [t / ideal for t in r],
        note="plain SDK, no kernel",
    )


def first_batch_stall(cfg: Config) -> None:
    """The longest the trio loop is blocked during the first 72-agent LLM batch of a fresh
    process, against later batches: a 1 ms heartbeat task over loopback, after
    ``gc.freeze()`` (tests/loop_stall_probe.py, one fresh interpreter per trial).  The
    "lazy" variant skips the orchestrator's ``aopen``: the client is built on the first
    request, on the loop, as before set-up moved to the bridge's entry."""
    trials = 3 if cfg.quick else 7
    for lazy in (False, True):
        reports = []
        for _ in range(trials):
            cmd = [sys.executable, "-m", "tests.loop_stall_probe", "--batches", "4"]
            out = subprocess.run(
                [*cmd, *(["--lazy"] if lazy else [])],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            reports.append(json.loads(out))
        variant = (
            "clients built on first request (before)"
            if lazy
            else "clients built on entry, in a thread (aopen)"
        )
        cfg.add(
            "first-batch loop stall",
            variant,
            "max heartbeat gap, first batch",
            "ms",
            [r["first_max_gap_ms"] for r in reports],
            target="" if lazy else "< 40 ms",
            note=f"{trials} fresh processes, gc.freeze() after set-up",
        )
        cfg.add(
            "first-batch loop stall",
            variant,
            "max heartbeat gap, batches 2-4",
            "ms",
            [r["later_max_gap_ms"] for r in reports],
        )
        if not lazy:
            cfg.add(
                "first-batch loop stall",
                variant,
                "max heartbeat gap, entering the bridge",
                "ms",
                [r["entry_max_gap_ms"] for r in reports],
                note="entering takes ~"
                f"{statistics.median(r['entry_ms'] for r in reports):.0f} ms, "
                "the loop runs meanwhile",
            )


def witness(cfg: Config) -> None:
    """72 outputs committed to the SQLite witness (FULL and NORMAL sync), concurrently."""
    import tempfile
    import uuid

    from adapters.sqlite_witness import SqliteWitness
    from kernel import AgentOutput

    for sync in ("FULL", "NORMAL"):

        async def main(sync: str = sync) -> tuple[list[float], int]:
            with tempfile.TemporaryDirectory() as tmp:
                async with SqliteWitness(Path(tmp) / "w.db", synchronous=sync) as w:  # type: ignore[arg-type]
                    times = []
                    for i in range(cfg.reps + cfg.warmup):
                        outputs = [
                            AgentOutput(f"archon-{j}", uuid.uuid4(), f"answer {i}/{j}")
                            for j in range(72)
                        ]
                        t0 = time.perf_counter()
                        async with trio.open_nursery() as nursery:
                            for out in outputs:
                                nursery.start_soon(w.commit, out)
                        if i >= cfg.warmup:
                            times.append((time.perf_counter() - t0) * 1e3)
                    assert (await w.verify()).ok
                    return times, w.transactions

        times, transactions = trio.run(main)
        per = transactions / (cfg.reps + cfg.warmup)
        cfg.add(
            "witness 72 commits",
            f"SqliteWitness synchronous={sync}",
            "batch commit",
            "ms",
            times,
            target="well under 20 ms",
            note=f"{per:.1f} transactions per batch (group commit)",
        )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def soak(cfg: Config) -> None:
    batches = 300 if cfg.quick else 2000
    warm = 100

    async def main() -> dict[str, Any]:
        rng = random.Random(7)
        stub = AgentOrchestratorStub(latency_ms=0.0)
        pool = AgentPool()
        service = ConcurrentDeliberationService(stub, HaltSwitch(), pool)
        ids = [f"archon-{i}" for i in range(1, 73)]
        rss0 = 0.0
        failures = 0
        t0 = time.perf_counter()
        for i in range(batches + warm):
            stub.set_fail_agents(a for a in ids if rng.random() < 0.05)
            result = await service.invoke_concurrent(requests_for(72))
            failures += result.failure_count
            if i == warm - 1:
                gc.collect()
                rss0 = _rss_mb()
        elapsed = time.perf_counter() - t0
        gc.collect()
        return {
            "growth_mb": _rss_mb() - rss0,
            "pool": pool.status().as_dict(),
            "failures": failures,
            "metrics": service.metrics.snapshot(),
            "elapsed_s": elapsed,
        }

    res = trio.run(main)
    cfg.add(
        f"soak {batches} x 72",
        "kernel",
        "RSS growth after warm-up",
        "MB",
        [res["growth_mb"]],
        target="<= 5 MB",
        note=f"pool after: {res['pool']['active_count']} active; "
        f"{res['failures']} random failures; {res['elapsed_s']:.1f} s",
    )
    cfg.extra["soak"] = res


def plot(cfg: Config, out: Path) -> None:
    """Elapsed vs number of agents, kernel vs reference (capacity 72, 10 ms agents)."""
    sizes = [10, 72, 144, 500, 1000, 2000] if cfg.quick else [10, 72, 144, 500, 1000, 2000, 5000]
    data: dict[str, list[float]] = {"kernel": [], "reference": [], "ideal": []}
    for n in sizes:
        k = trio_reps(kernel_setup(n, 10.0, capacity=72, overflow="queue"), 3, 1)
        r = asyncio_reps(reference_setup(n, 10.0, capacity=72, admit=False), 3, 1)
        data["kernel"].append(statistics.median(k) * 1e3)
        data["reference"].append(statistics.median(r) * 1e3)
        data["ideal"].append(math.ceil(n / 72) * 10.0)
    cfg.extra["plot"] = {"sizes": sizes, **data}
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot; pip install -e '.[bench]')")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(sizes, data["ideal"], "k:", label="ideal: ceil(n/72) x 10 ms")
    ax.plot(sizes, data["kernel"], "o-", label="conclave-kernel (trio, overflow=queue)")
    ax.plot(sizes, data["reference"], "s--", label="reference (asyncio.gather + Semaphore)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents in the batch (capacity 72, 10 ms each)")
    ax.set_ylabel("batch elapsed (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "agents_vs_elapsed.png", dpi=110)
    plt.close(fig)


SCENARIOS: dict[str, Callable[[Config], None]] = {
    "seed-timing": seed_timing,
    "full-council": full_council,
    "overhead": overhead,
    "queue": queue,
    "scale": scale,
    "halt": halt,
    "bridge": bridge,
    "bridge-halt": bridge_halt,
    "llm-loopback": llm_loopback,
    "first-batch-stall": first_batch_stall,
    "witness": witness,
    "soak": soak,
}

# ---------------------------------------------------------------- output


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import attrs

    info = {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "trio": trio.__version__,
        "attrs": attrs.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        import openai
        import trio_asyncio

        info["openai"] = openai.__version__
        info["trio_asyncio"] = trio_asyncio.__version__
    except ImportError:
        pass
    return info


def fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}" if abs(x) < 1 else f"{x:.2f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| scenario | variant | metric | median | spread (min-max) | target | note |",
        "|---|---|---|---:|---|---|---|",
    ]
    for r in rows:
        spread = f"{fmt(r.low)} - {fmt(r.high)}" if len(r.samples) > 1 else ""
        lines.append(
            f"| {r.scenario} | {r.variant} | {r.metric} | {fmt(r.median)} {r.unit} | {spread} "
            f"| {r.target} | {r.note} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< 1 min)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=sorted(SCENARIOS),
        metavar="NAME",
        help=f"run only these: {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--update-readme",
        action="store_true",
        help="replace the table between the README's bench markers",
    )
    args = parser.parse_args(argv)

    cfg = Config(quick=args.quick, reps=5 if args.quick else 15, warmup=1 if args.quick else 3)
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    print(f"# conclave-kernel benchmarks ({'quick' if args.quick else 'full'})")
    print(f"{info['cpu']} x{info['cpus']}, Python {info['python']}, trio {info['trio']}\n")
    t_all = time.perf_counter()
    for name in args.only or list(SCENARIOS):
        t0 = time.perf_counter()
        before = len(cfg.rows)
        SCENARIOS[name](cfg)
        print(table(cfg.rows[before:]).split("\n", 2)[2])
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if not args.no_plot and not args.only:
        plot(cfg, args.out)
    total = time.perf_counter() - t_all

    md = (
        f"Run {info['date']} on {info['cpu']} x{info['cpus']}, Python {info['python']}, "
        f"trio {info['trio']} ({'quick' if args.quick else 'full'}, {total:.0f} s).\n\n"
        + table(cfg.rows)
        + "\n"
    )
    (args.out / "results.md").write_text(md)
    (args.out / "results.json").write_text(
        json.dumps(
            {
                "machine": info,
                "mode": "quick" if args.quick else "full",
                "total_s": total,
                "rows": [
                    {**asdict(r), "median": r.median, "min": r.low, "max": r.high} for r in cfg.rows
                ],
                "extra": cfg.extra,
            },
            indent=2,
            default=str,
        )
    )
    print("\n" + md)
    print(f"wrote {args.out / 'results.json'}", file=sys.stderr)
    if args.update_readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        start, end = "<!-- bench:start -->", "<!-- bench:end -->"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            tail = rest.split(end, 1)[1]
            readme.write_text(f"{head}{start}\n{md}{end}{tail}")
            print("updated README.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
