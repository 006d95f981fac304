"""What resuming a halted batch saves: a 72-agent batch halted once half its agents have
answered, then resumed, against running it again from scratch."""

from __future__ import annotations

import math
import random
import tempfile
from pathlib import Path
from uuid import UUID, uuid4

import trio

from adapters.witness.sqlite import SqliteWitness
from benchmarks.results import Results, Row, Settings
from benchmarks.timing import ms
from benchmarks.workloads import requests_for
from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
    SystemHaltedError,
)

__all__ = ["resume"]

N = 72


class FixedLatencies:
    """Each agent answers after its own latency, the same in every run (a model's answer
    length is the agent's), drawn once: lognormal, median 100 ms.  Counts its calls."""

    def __init__(self, seed: int = 7) -> None:
        rng = random.Random(seed)
        self.latency = {f"archon-{i + 1}": 0.1 * math.exp(rng.gauss(0, 0.5)) for i in range(N)}
        self.calls = 0

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.calls += 1
        await trio.sleep(self.latency[agent_id])
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content=f"{agent_id}: yes")


def resume(s: Settings, results: Results) -> None:
    """Halted at 50 %, cleared, resumed: wall time and provider calls of the resumed run
    against a full rerun, in reject mode (72 at once) and queue mode (12 at a time: a
    provider's concurrency limit)."""
    for capacity in (72, 12):
        full, resumed, calls = trio.run(_measure, capacity, s.reps, s.warmup)
        name = f"resume {N} halted at 50 %, pool {capacity}"
        note = f"provider calls: rerun {calls[0]}, resume {calls[1]}"
        results.add(Row(name, "full rerun", "batch time", "ms", ms(full), "", note))
        results.add(Row(name, "resume", "batch time", "ms", ms(resumed), "", note))


async def _measure(
    capacity: int, reps: int, warmup: int
) -> tuple[list[float], list[float], tuple[int, int]]:
    full: list[float] = []
    resumed: list[float] = []
    calls = (0, 0)
    with tempfile.TemporaryDirectory() as tmp:
        async with SqliteWitness(Path(tmp) / "w.db") as witness:
            for i in range(warmup + reps):
                rerun_t, rerun_calls = await _timed_run(witness, capacity, None)
                batch = await _halted_at_half(witness, capacity)
                resume_t, resume_calls = await _timed_run(witness, capacity, batch)
                if i >= warmup:
                    full.append(rerun_t)
                    resumed.append(resume_t)
                    calls = (rerun_calls, resume_calls)
    return full, resumed, calls


async def _halted_at_half(witness: SqliteWitness, capacity: int) -> UUID:
    switch = HaltSwitch()

    def progress(done: int, _total: int, _agent: str, _status: str) -> None:
        if done == N // 2:
            switch.halt("benchmark: halted at 50 %")

    service = ConcurrentDeliberationService(
        FixedLatencies(), switch, AgentPool(capacity), witness=witness
    )
    try:
        await service.invoke_concurrent(requests_for(N), overflow="queue", on_progress=progress)
    except SystemHaltedError as exc:
        assert exc.partial is not None
        return exc.partial.batch_id
    raise RuntimeError("the batch was not halted")


async def _timed_run(
    witness: SqliteWitness, capacity: int, batch: UUID | None
) -> tuple[float, int]:
    orchestrator = FixedLatencies()
    service = ConcurrentDeliberationService(
        orchestrator, None, AgentPool(capacity), witness=witness
    )
    t0 = trio.current_time()
    result = await service.invoke_concurrent(requests_for(N), overflow="queue", resume=batch)
    elapsed = trio.current_time() - t0
    if result.success_count != N:
        raise RuntimeError(f"{N - result.success_count} agents failed")
    return elapsed, orchestrator.calls
