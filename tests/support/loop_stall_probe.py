"""Measure how long the trio loop is blocked during the first and later LLM batches.

Run it in a fresh interpreter (the first batch is what pays for lazy imports and client
set-up)::

    python -m tests.support.loop_stall_probe [--agents 72] [--batches 5] [--no-freeze]

It starts the loopback server (tests/support/fake_openai.py) in a process of its own, so that the
server does not compete with the client for the GIL, then does what an application does:
import, build an ``OpenAIChatOrchestrator``, enter the ``AsyncioOrchestratorBridge``,
call ``gc.freeze()`` (the README's advice for latency-sensitive apps), and run batches of
agents, while a trio task wakes every millisecond.  The largest gap between two wake-ups
is how long a halt raised at the worst instant would have waited for the loop.  Prints one
JSON object: ``first_max_gap_ms``, ``later_max_gap_ms`` (over the batches after the first),
``entry_ms`` and ``entry_max_gap_ms`` (entering the bridge), the per-batch maxima, and
what the first batch still had to build (clients, imported modules).  ``--lazy`` skips
the orchestrator's ``aopen``, which is how the first batch behaved before set-up moved
to the entry.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from typing import Any

import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from kernel import (
    AgentOutput,
    AgentRequest,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
)
from tests.support import ROOT


class Heartbeat:
    """A trio task that wakes every millisecond and keeps the largest gap it saw."""

    def __init__(self) -> None:
        self.max_gap_s = 0.0
        self._last = 0.0

    def reset(self) -> None:
        self.max_gap_s = 0.0
        self._last = time.perf_counter()

    async def run(self) -> None:
        self.reset()
        while True:
            await trio.sleep(0.001)
            now = time.perf_counter()
            self.max_gap_s = max(self.max_gap_s, now - self._last)
            self._last = now


class WithoutSetUp:
    """The orchestrator minus its ``aopen``: clients are built on the first request, on the
    loop, as before set-up moved to the bridge's entry (``--lazy``, for comparison)."""

    def __init__(self, inner: OpenAIChatOrchestrator) -> None:
        self.inner = inner

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        return await self.inner.invoke(agent_id, context)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def measure(
    base_url: str, agents: int, batches: int, freeze: bool, lazy: bool
) -> dict[str, Any]:
    context = ContextBundle("stall", "Should the council adopt the motion?")
    requests = [AgentRequest(agent_id=f"archon-{i + 1}", context=context) for i in range(agents)]
    orchestrator = OpenAIChatOrchestrator(base_url, "fake-model", timeout_s=30)
    inner: Any = WithoutSetUp(orchestrator) if lazy else orchestrator
    beat = Heartbeat()
    gaps: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(beat.run)
        await trio.sleep(0.02)  # the heartbeat is ticking
        beat.reset()
        t0 = time.perf_counter()
        async with AsyncioOrchestratorBridge(inner) as bridge:
            setup_ms = (time.perf_counter() - t0) * 1e3
            entry_gap_ms = beat.max_gap_s * 1e3
            service = ConcurrentDeliberationService(bridge, HaltSwitch())
            if freeze:
                gc.collect()
                gc.freeze()
            modules = set(sys.modules)
            clients = dict(orchestrator._clients)  # what set-up built before any request
            for _ in range(batches):
                beat.reset()
                result = await service.invoke_concurrent(requests)
                gaps.append(beat.max_gap_s * 1e3)
                if result.success_count != agents:
                    raise RuntimeError(f"batch failed: {result.failures[:1]}")
                if len(gaps) == 1:
                    imported = sorted(set(sys.modules) - modules)
                    built = sorted(set(orchestrator._clients) - set(clients))
        nursery.cancel_scope.cancel()
    return {
        "agents": agents,
        "batches": batches,
        "gc_freeze": freeze,
        "set_up": "first request (lazy)" if lazy else "entry (aopen)",
        "entry_ms": round(setup_ms, 2),
        "entry_max_gap_ms": round(entry_gap_ms, 2),
        "first_max_gap_ms": round(gaps[0], 2),
        "later_max_gap_ms": round(max(gaps[1:], default=float("nan")), 2),
        "per_batch_max_gap_ms": [round(g, 2) for g in gaps],
        "clients_built_on_entry": sorted(clients),
        "clients_built_in_first_batch": built,
        "modules_imported_in_first_batch": imported,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=72)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--no-freeze", action="store_true", help="skip gc.freeze()")
    parser.add_argument("--lazy", action="store_true", help="skip aopen (the old behaviour)")
    args = parser.parse_args(argv)
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.support.fake_openai"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        base_url = f"http://127.0.0.1:{int(server.stdout.readline())}/v1"
        report = trio.run(
            measure, base_url, args.agents, args.batches, not args.no_freeze, args.lazy
        )
    finally:
        server.kill()
        server.wait()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
