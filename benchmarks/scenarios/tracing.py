"""What tracing costs: CPU per agent with OpenTelemetry spans exported over OTLP/HTTP against
without, the same service and batches, alternated in one run.

Through the whole LLM path (kernel + bridge + openai against the loopback server, each
server in a process of its own), and on the stub alone, where the kernel's own cost is
smallest and the spans' cost stands out.  A traced batch's CPU includes exporting its
spans (protobuf, HTTP): the processor is flushed inside the measurement.
"""

from __future__ import annotations

import time

import trio

from adapters.stub import AgentOrchestratorStub
from benchmarks.processes import fake_server, otlp_collector
from benchmarks.results import Results, Row, Settings
from benchmarks.workloads import ServiceBatch
from kernel import AgentOrchestratorProtocol, ConcurrentDeliberationService, HaltSwitch

__all__ = ["tracing"]

_N = 72


def tracing(s: Settings, results: Results) -> None:
    reps = max(12, s.reps)  # paired ratios: enough of them for a median on a busy machine
    with otlp_collector() as endpoint:
        with fake_server() as base_url:
            off, on = trio.run(_llm_cpu, base_url, endpoint, reps)
        name = f"tracing {_N} agents, LLM loopback"
        _rows(results, name, off, on, "ms", "<= 1.10x")
        off, on = trio.run(_stub_cpu, endpoint, reps * 4)
        _rows(results, f"tracing {_N} agents, stub", off, on, "us", "")
        extra = [b - a for a, b in zip(off, on, strict=True)]
        note = "the spans' own cost per agent: its span, 1/72 of the batch's, the export"
        results.add(
            Row(f"tracing {_N} agents, stub", "on - off", "CPU per agent", "us", extra, note=note)
        )


def _rows(
    results: Results, name: str, off: list[float], on: list[float], unit: str, target: str
) -> None:
    results.add(Row(name, "tracing off", "CPU per agent", unit, off))
    note = "BatchSpanProcessor + OTLP/HTTP exporter, flushed in the measurement"
    results.add(Row(name, "tracing on (OTLP/HTTP)", "CPU per agent", unit, on, note=note))
    ratio = [b / a for a, b in zip(off, on, strict=True)]
    results.add(Row(name, "on / off", "CPU per agent", "x", ratio, target))


async def _llm_cpu(base_url: str, endpoint: str, reps: int) -> tuple[list[float], list[float]]:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    orchestrator = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=60)
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        off, on = await _alternated(bridge, endpoint, reps, scale=1000.0)
    return off, on


async def _stub_cpu(endpoint: str, reps: int) -> tuple[list[float], list[float]]:
    return await _alternated(AgentOrchestratorStub(latency_ms=0.0), endpoint, reps, scale=1e6)


async def _alternated(
    orchestrator: AgentOrchestratorProtocol, endpoint: str, reps: int, scale: float
) -> tuple[list[float], list[float]]:
    """CPU per agent (``scale``: per second) of batches without and with tracing, one of
    each in turn, after a warm-up batch of each."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from adapters.tracing import DeliberationTracer

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    plain = ConcurrentDeliberationService(orchestrator, HaltSwitch())
    traced = ConcurrentDeliberationService(orchestrator, HaltSwitch())
    traced.metrics.add_observer(DeliberationTracer(provider))
    batches = {False: ServiceBatch(plain, _N), True: ServiceBatch(traced, _N)}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    try:
        for rep in range(reps + 1):
            # Which goes first alternates too: neither always meets a warmer cache.
            for on in (False, True) if rep % 2 else (True, False):
                began = time.process_time()
                await batches[on]()
                if on:
                    await trio.to_thread.run_sync(provider.force_flush)
                if rep:  # the first round warms up
                    cpu[on].append((time.process_time() - began) / _N * scale)
    finally:
        await trio.to_thread.run_sync(provider.shutdown)
    return cpu[False], cpu[True]
