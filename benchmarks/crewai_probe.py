"""The CrewAI measurements, run inside .venv-crewai by the ``crewai`` scenario (crewai
cannot be installed beside the main environment's openai 3); prints one JSON report.

    .venv-crewai/bin/python -m benchmarks.crewai_probe --base-url URL [--reps N] [--halts N]

- *CPU per agent*: process CPU time of one 72-agent batch through kernel + bridge, divided
  by 72, for :class:`~adapters.llm.crewai.CrewAIOrchestrator` and for the plain
  :class:`~adapters.llm.openai_chat.OpenAIChatOrchestrator`, batches interleaved, same process,
  same SDK, against the loopback server at ``URL`` (a process of its own, so its CPU is
  not counted); and the bare SDK (72 ``AsyncOpenAI`` clients, one per agent as CrewAI
  has them, ``asyncio.gather``, no kernel, no CrewAI) for the floor.
- *Halt with 72 open CrewAI requests*: the server (a thread here, so that its counters
  say when all 72 are open) never answers; halt; time until ``SystemHaltedError``
  reaches the caller, and until the server has seen all 72 connections go away.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import Sequence
from typing import Any

import openai
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.crewai import CrewAIOrchestrator
from adapters.llm.openai_chat import AGENT_HEADER, OpenAIChatOrchestrator
from adapters.roster import Roster
from benchmarks.workloads import requests_for
from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch, SystemHaltedError
from tests.support.fake_openai import FakeOpenAIServer

AGENTS = 72


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.crewai_probe")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--halts", type=int, default=10)
    args = parser.parse_args(argv)
    report: dict[str, Any] = {}
    report["cpu_ms_per_agent"], report["wall_ms"] = trio.run(
        _cpu_per_agent, args.base_url, args.reps
    )
    server = FakeOpenAIServer().start()
    try:
        server.default = "hang"
        report["halt_ms"], report["closed_ms"] = trio.run(_halts, server, args.halts)
    finally:
        server.stop()
    print(json.dumps(report))


async def _cpu_per_agent(
    base_url: str, reps: int
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    roster = Roster.default(AGENTS)
    plain = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=30)
    crew = CrewAIOrchestrator(roster, base_url=base_url, model="fake-model", timeout_s=30)
    orchestrators = ("openai", "crewai")
    cpu: dict[str, list[float]] = {name: [] for name in (*orchestrators, "sdk")}
    wall: dict[str, list[float]] = {name: [] for name in (*orchestrators, "sdk")}
    clients = [
        openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=30)
        for _ in range(AGENTS)
    ]

    async def bare_sdk() -> None:
        async def one(i: int, client: openai.AsyncOpenAI) -> None:
            await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": "Should the council adopt the motion?"}],
                extra_headers={AGENT_HEADER: f"archon-{i + 1}"},
            )

        await asyncio.gather(*(one(i, c) for i, c in enumerate(clients)))

    async with (
        AsyncioOrchestratorBridge(plain) as openai_bridge,
        AsyncioOrchestratorBridge(crew) as crewai_bridge,
    ):
        services = {
            "openai": ConcurrentDeliberationService(openai_bridge, HaltSwitch()),
            "crewai": ConcurrentDeliberationService(crewai_bridge, HaltSwitch()),
        }
        requests = requests_for(AGENTS)
        for i in range(1 + reps):  # one to warm up
            for name, service in services.items():  # interleaved: same conditions
                c0, t0 = time.process_time(), time.perf_counter()
                result = await service.invoke_concurrent(requests)
                c1, t1 = time.process_time(), time.perf_counter()
                if result.success_count != AGENTS:
                    raise RuntimeError(f"{name}: {result.failures[:2]}")
                if i:
                    cpu[name].append((c1 - c0) * 1e3 / AGENTS)
                    wall[name].append((t1 - t0) * 1e3)
            c0, t0 = time.process_time(), time.perf_counter()
            await crewai_bridge.run_asyncio(bare_sdk)
            c1, t1 = time.process_time(), time.perf_counter()
            if i:
                cpu["sdk"].append((c1 - c0) * 1e3 / AGENTS)
                wall["sdk"].append((t1 - t0) * 1e3)
        for client in clients:
            await crewai_bridge.run_asyncio(client.close)
    return cpu, wall


async def _halts(server: FakeOpenAIServer, trials: int) -> tuple[list[float], list[float]]:
    roster = Roster.default(AGENTS)
    orchestrator = CrewAIOrchestrator(
        roster, base_url=server.base_url, model="fake-model", timeout_s=600
    )
    pool = AgentPool()
    halts: list[float] = []
    closed: list[float] = []
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        for i in range(1 + trials):  # one to warm up
            server.reset()
            server.default = "hang"
            switch = HaltSwitch()
            service = ConcurrentDeliberationService(bridge, switch, pool)
            halted_at = math.nan

            async def halter(switch: HaltSwitch = switch) -> None:
                nonlocal halted_at
                opened = await trio.to_thread.run_sync(
                    server.wait_for, lambda s: s.in_flight == AGENTS, 30.0
                )
                if not opened:
                    raise RuntimeError("the 72 requests never were all open")
                halted_at = time.perf_counter()
                switch.halt("benchmark")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(halter)
                try:
                    await service.invoke_concurrent(requests_for(AGENTS))
                    raise RuntimeError("the batch finished before the halt")
                except SystemHaltedError:
                    returned = time.perf_counter()
            gone = await trio.to_thread.run_sync(
                server.wait_for, lambda s: s.disconnects == AGENTS and s.in_flight == 0, 30.0
            )
            all_closed = time.perf_counter()
            if not gone or pool.active_count:
                raise RuntimeError("requests left open or agents left in the pool")
            if i:
                halts.append((returned - halted_at) * 1e3)
                closed.append((all_closed - halted_at) * 1e3)
    return halts, closed


if __name__ == "__main__":
    main()
