"""Every scenario, by the name ``--only`` takes, in the order a full run runs them.

A scenario is a function of the run's :class:`~benchmarks.results.Settings` that adds its
rows to the :class:`~benchmarks.results.Results`; each measures the kernel and, where one
exists, a baseline in the same process.
"""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.results import Results, Settings
from benchmarks.scenarios.asyncio_host import asyncio_host
from benchmarks.scenarios.cluster import cluster
from benchmarks.scenarios.crewai import crewai
from benchmarks.scenarios.durability import soak, witness
from benchmarks.scenarios.halting import bridge_halt, halt
from benchmarks.scenarios.llm import (
    bridge,
    first_batch_stall,
    llm_call_cpu,
    llm_loopback,
    llm_stream,
)
from benchmarks.scenarios.ratelimit import rate_limited
from benchmarks.scenarios.resume import resume
from benchmarks.scenarios.shared_budget import shared_budget
from benchmarks.scenarios.tail import tail, tail_http
from benchmarks.scenarios.throughput import full_council, overhead, queue, scale, seed_timing
from benchmarks.scenarios.tracing import tracing

__all__ = ["SCENARIOS", "Scenario"]

Scenario = Callable[[Settings, Results], None]

SCENARIOS: dict[str, Scenario] = {
    "seed-timing": seed_timing,
    "full-council": full_council,
    "overhead": overhead,
    "queue": queue,
    "scale": scale,
    "halt": halt,
    "bridge": bridge,
    "bridge-halt": bridge_halt,
    "llm-loopback": llm_loopback,
    "llm-stream": llm_stream,
    "llm-call-cpu": llm_call_cpu,
    "first-batch-stall": first_batch_stall,
    "asyncio-host": asyncio_host,
    "tail": tail,
    "tail-http": tail_http,
    "rate-limited": rate_limited,
    "tracing": tracing,
    "crewai": crewai,
    "witness": witness,
    "resume": resume,
    "soak": soak,
    "cluster": cluster,
    "shared-budget": shared_budget,
}
