"""Real CrewAI agents (adapters.llm.crewai): their CPU cost per agent against the plain OpenAI
orchestrator, and how soon a halt closes 72 open CrewAI requests.

crewai lives in .venv-crewai (it pins openai<3), so its half runs there, in a process of
its own (``benchmarks.crewai_probe``), against the same loopback server as the
main-environment half measured here.  Without .venv-crewai (``make setup-crewai``) the
scenario says so and adds no rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import trio

from benchmarks.processes import ROOT, fake_server
from benchmarks.results import Results, Row, Settings
from benchmarks.workloads import requests_for
from kernel import ConcurrentDeliberationService, HaltSwitch

__all__ = ["crewai"]

CREWAI_PYTHON = ROOT / ".venv-crewai" / "bin" / "python"
AGENTS = 72


def crewai(s: Settings, results: Results) -> None:
    """72 agents, 50 ms answers: CPU per agent of kernel + bridge + CrewAI against
    kernel + bridge + the OpenAI orchestrator (in both environments); then halts with
    72 CrewAI requests open."""
    if not CREWAI_PYTHON.exists():
        print("  crewai: skipped (no .venv-crewai: make setup-crewai)", file=sys.stderr)
        return
    reps = 3 if s.quick else 9
    with fake_server("--latency", "0.05") as base_url:
        main_env = trio.run(_openai_cpu_ms_per_agent, base_url, reps)
        probe = subprocess.run(
            [
                str(CREWAI_PYTHON),
                "-m",
                "benchmarks.crewai_probe",
                "--base-url",
                base_url,
                "--reps",
                str(reps),
                "--halts",
                str(5 if s.quick else 15),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    report = json.loads(probe.stdout.splitlines()[-1])
    cpu = report["cpu_ms_per_agent"]
    name, metric = "crewai 72 @50 ms", "CPU per agent"
    results.add(
        Row(
            name,
            "kernel + bridge + OpenAIChatOrchestrator",
            metric,
            "ms",
            main_env,
            note="main env: openai 3 (httpx2)",
        )
    )
    results.add(
        Row(
            name,
            "kernel + bridge + OpenAIChatOrchestrator",
            metric,
            "ms",
            cpu["openai"],
            note="crewai env: openai 2 (httpcore); one pool for 72 agents",
        )
    )
    results.add(
        Row(
            name,
            "asyncio.gather + openai, a client per agent",
            metric,
            "ms",
            cpu["sdk"],
            note="crewai env; no kernel, no CrewAI: the floor",
        )
    )
    results.add(
        Row(
            name,
            "kernel + bridge + CrewAIOrchestrator",
            metric,
            "ms",
            cpu["crewai"],
            note="crewai env; a pool per agent",
        )
    )
    name, note = "halt, 72 open CrewAI requests", "server in-process: a thread"
    results.add(
        Row(
            name,
            "CrewAIOrchestrator",
            "halt -> SystemHaltedError",
            "ms",
            report["halt_ms"],
            target="< 100 ms",
            note=note,
        )
    )
    results.add(
        Row(
            name,
            "CrewAIOrchestrator",
            "halt -> server saw 72 disconnects",
            "ms",
            report["closed_ms"],
        )
    )


async def _openai_cpu_ms_per_agent(base_url: str, reps: int) -> list[float]:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator

    samples = []
    orchestrator = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=30)
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch())
        requests = requests_for(AGENTS)
        for i in range(1 + reps):  # one to warm up
            c0 = time.process_time()
            result = await service.invoke_concurrent(requests)
            if result.success_count != AGENTS:
                raise RuntimeError(f"openai: {result.failures[:2]}")
            if i:
                samples.append((time.process_time() - c0) * 1e3 / AGENTS)
    return samples
