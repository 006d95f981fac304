"""What a long-lived service costs: witness commits to SQLite, memory over many batches."""

from __future__ import annotations

import gc
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Literal

import attrs
import trio

from adapters.stub import AgentOrchestratorStub
from adapters.witness.sqlite import SqliteWitness
from benchmarks.results import Results, Row, Settings
from benchmarks.timing import ms, timed
from benchmarks.workloads import requests_for
from kernel import AgentOutput, AgentPool, ConcurrentDeliberationService, HaltSwitch

__all__ = ["soak", "witness"]


def witness(s: Settings, results: Results) -> None:
    """72 outputs committed to the SQLite witness concurrently, with synchronous FULL and
    NORMAL; the witness groups them into few transactions."""
    for sync in ("FULL", "NORMAL"):
        times, transactions = trio.run(_witness_batches, sync, s.reps, s.warmup)
        per_batch = transactions / (s.reps + s.warmup)
        note = f"{per_batch:.1f} transactions per batch (group commit)"
        variant, target = f"SqliteWitness synchronous={sync}", "well under 20 ms"
        results.add(
            Row("witness 72 commits", variant, "batch commit", "ms", ms(times), target, note)
        )


@attrs.frozen
class SoakReport:
    growth_mb: float
    pool: dict[str, int]
    failures: int
    metrics: dict[str, object]
    elapsed_s: float


def soak(s: Settings, results: Results) -> None:
    """Thousands of 72-agent batches, 5% of agents failing at random: the process's RSS
    after them against after a warm-up, and the pool empty at the end."""
    batches = 300 if s.quick else 2000
    report = trio.run(_soak, batches, 100)
    note = (
        f"pool after: {report.pool['active_count']} active; "
        f"{report.failures} random failures; {report.elapsed_s:.1f} s"
    )
    name, metric = f"soak {batches} x 72", "RSS growth after warm-up"
    results.add(Row(name, "kernel", metric, "MB", [report.growth_mb], "<= 5 MB", note))
    results.extra["soak"] = attrs.asdict(report)


async def _witness_batches(
    sync: Literal["FULL", "NORMAL"], reps: int, warmup: int
) -> tuple[list[float], int]:
    batches = iter(
        [AgentOutput(f"archon-{j}", uuid.uuid4(), f"answer {i}/{j}") for j in range(72)]
        for i in range(warmup + reps)
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with SqliteWitness(Path(tmp) / "w.db", synchronous=sync) as w:

            async def commit_next_batch() -> None:
                async with trio.open_nursery() as nursery:
                    for output in next(batches):
                        nursery.start_soon(w.commit, output)

            times = await timed(commit_next_batch, reps, warmup)
            if not (await w.verify()).ok:
                raise RuntimeError("the witness's chain does not verify")
            return times, w.transactions


async def _soak(batches: int, warm_up: int) -> SoakReport:
    rng = random.Random(7)
    stub = AgentOrchestratorStub(latency_ms=0.0)
    pool = AgentPool()
    service = ConcurrentDeliberationService(stub, HaltSwitch(), pool)
    ids = [f"archon-{i}" for i in range(1, 73)]
    rss_after_warm_up = 0.0
    failures = 0
    t0 = time.perf_counter()
    for i in range(warm_up + batches):
        stub.set_fail_agents(a for a in ids if rng.random() < 0.05)
        result = await service.invoke_concurrent(requests_for(72))
        failures += result.failure_count
        if i == warm_up - 1:
            gc.collect()
            rss_after_warm_up = _rss_mb()
    elapsed = time.perf_counter() - t0
    gc.collect()
    return SoakReport(
        growth_mb=_rss_mb() - rss_after_warm_up,
        pool=pool.status().as_dict(),
        failures=failures,
        metrics=service.metrics.snapshot().as_dict(),
        elapsed_s=elapsed,
    )


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
