"""A hostile LLM server against the OpenAI orchestrator: each mode's outcome, time and memory.

    python -m benchmarks.hostile_server [--agents 1 72] [--timeout 2]
    .venv-crewai/bin/python -m benchmarks.hostile_server --backend crewai

Each mode runs in a fresh interpreter (so its peak RSS is its own): the loopback server of
tests/support/fake_openai.py plays the mode against a batch of agents through the bridge; the
row says how every agent ended, the batch's wall time, the client thread's CPU time, and
the process's peak RSS above its level just before the batch.  Not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import Counter
from typing import Any

MODES: dict[str, Any] = {
    "trickle (1 byte / 0.5 s)": ("trickle", 0.5),
    "100 Continue storm (500/s)": ("continue_storm", 0.002),
    "huge body (300 MB)": ("huge_body", 300 * 2**20),
    "gzip bomb (1 GiB)": ("gzip_bomb", 2**30),
    "deflate bomb (1 GiB)": ("deflate_bomb", 2**30),
    "endless chunked": "endless_chunked",
    "endless SSE": "endless_sse",
    "redirect to another origin": ("redirect", "http://127.0.0.1:9/v1/chat/completions"),
    "deep JSON (200k)": ("deep_json", 200_000),
}


def run_mode(fault: Any, agents: int, timeout_s: float, backend: str) -> dict[str, Any]:
    """In this process: one batch against ``fault``; what happened."""
    import resource
    import time

    import trio

    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator
    from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch
    from tests.support.fake_openai import FakeOpenAIServer, bomb
    from tests.support.helpers import make_requests

    server = FakeOpenAIServer().start()
    if isinstance(fault, tuple) and fault[0].endswith("_bomb"):
        bomb(fault[0] == "gzip_bomb", fault[1])  # built before, not during, the batch
    server.default = fault

    def rss() -> int:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * resource.getpagesize()

    async def batch() -> dict[str, Any]:
        orchestrator: Any = OpenAIChatOrchestrator(
            server.base_url, "fake-model", timeout_s=timeout_s, max_retries=0
        )
        if backend == "crewai":
            from adapters.llm.crewai import CrewAIOrchestrator
            from adapters.roster import Roster

            orchestrator = CrewAIOrchestrator(
                Roster.default(agents),
                base_url=server.base_url,
                model="fake-model",
                timeout_s=timeout_s,
                max_retries=0,
            )
        async with AsyncioOrchestratorBridge(orchestrator) as bridge:
            service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
            base = rss()
            cpu, t0 = time.thread_time(), time.monotonic()
            result = await service.invoke_concurrent(make_requests(agents))
            elapsed, cpu = time.monotonic() - t0, time.thread_time() - cpu
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        outcomes = Counter(_short(f.message) for f in result.failures)
        outcomes.update({"ok": result.success_count} if result.success_count else {})
        return {
            "outcomes": dict(outcomes),
            "seconds": round(elapsed, 2),
            "cpu_s": round(cpu, 2),
            "peak_rss_growth_mb": round(max(0, peak - base) / 2**20, 1),
        }

    try:
        return trio.run(batch)
    finally:
        server.stop()


def _short(message: str) -> str:
    """The failure without the agent's name: what happened."""
    _, _, what = message.partition("): ")
    return what.replace(" (max_response_bytes); not retried", "")[:70]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[1, 72])
    parser.add_argument("--timeout", type=float, default=2.0)
    parser.add_argument("--backend", choices=("openai", "crewai"), default="openai")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child: "mode-name|agents"
    args = parser.parse_args()
    if args.one:
        name, agents = args.one.rsplit("|", 1)
        print(json.dumps(run_mode(MODES[name], int(agents), args.timeout, args.backend)))
        return
    print(f"{args.backend}: timeout_s = {args.timeout:g}, max_retries = 0\n")
    print("| mode | agents | outcome (agents) | time s | client CPU s | peak RSS growth MB |")
    print("|---|---|---|---|---|---|")
    for name in MODES:
        for agents in args.agents:
            child = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.hostile_server",
                    "--one",
                    f"{name}|{agents}",
                    "--timeout",
                    str(args.timeout),
                    "--backend",
                    args.backend,
                ],
                capture_output=True,
                text=True,
                timeout=300,
                check=True,
            )
            row = json.loads(child.stdout.strip().splitlines()[-1])
            outcome = "; ".join(f"{what} ({n})" for what, n in row["outcomes"].items())
            print(
                f"| {name} | {agents} | {outcome} | {row['seconds']} | {row['cpu_s']} | "
                f"{row['peak_rss_growth_mb']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
