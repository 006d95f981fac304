"""A council against a rate-limited provider: 3 batches of 72 agents, a server that takes
120 requests a "minute" (time-scaled: its window is 1 s), in a process of its own.

Three clients, same run, each against a fresh server (so each starts with an empty
window and a budget of its own):

* reference: the plain openai SDK under ``asyncio.gather``, every agent retrying its own
  429s (the SDK's own retries, ``max_retries=3``: exponential backoff with jitter, after
  the ``Retry-After`` it is given);
* the kernel + bridge + ``OpenAIChatOrchestrator`` without limits: it follows the
  server's ``x-ratelimit-*`` headers, and a 429 pauses every agent of the endpoint;
* the same with ``ProviderLimits`` set to the server's limit.

Measured: the time to complete all three batches against the limit's ideal (216 calls at
120 a window: 1.8 s), the calls answered 429 (counted by the server), the agents that
failed.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import trio

from benchmarks.processes import fake_server
from benchmarks.results import Results, Row, Settings
from benchmarks.workloads import requests_for
from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch

__all__ = ["rate_limited"]

LIMIT = 120  # requests per window
WINDOW_S = 1.0  # the server's "minute"
AGENTS, BATCHES = 72, 3
IDEAL_S = AGENTS * BATCHES / LIMIT * WINDOW_S  # the limit's own pace: 1.8 s


def rate_limited(s: Settings, results: Results) -> None:
    reps = 2 if s.quick else 5
    name = f"rate-limited {BATCHES}x{AGENTS} @{LIMIT}/min (time-scaled)"
    variants = (
        ("reference: SDK, each agent retries alone", _sdk_alone),
        ("kernel + openai, no limits (headers, shared pause)", _kernel_no_limits),
        ("kernel + openai, ProviderLimits", _kernel_with_limits),
    )
    for variant, client in variants:
        elapsed, refused, calls, failed = [], [], [], []
        for _ in range(reps):
            with fake_server("--rate-limit", f"{LIMIT}:100000000:{WINDOW_S}") as base_url:
                seconds, failures = client(base_url)
                stats = _server_stats(base_url)
            elapsed.append(seconds)
            failed.append(failures)
            refused.append(stats["rate_limited"])
            calls.append(stats["requests_total"])
        limits = variant.endswith("ProviderLimits")
        share = [100.0 * r / c for r, c in zip(refused, calls, strict=True)]
        results.add(
            Row(name, variant, "completion/ideal", "x", [e / IDEAL_S for e in elapsed],
                target="<= 1.1 x" if limits else "", note=f"ideal {IDEAL_S:g} s")
        )  # fmt: skip
        results.add(Row(name, variant, "calls answered 429", "%", share,
                        target="<= 1 %" if limits else ""))  # fmt: skip
        note = _NOTES.get(variant, "")
        results.add(Row(name, variant, "HTTP 429s", "calls", refused, note=note))
        results.add(Row(name, variant, "failed agents", "agents", failed,
                        target="0" if limits else ""))  # fmt: skip


_NOTES = {
    "reference: SDK, each agent retries alone": (
        "bursts into the empty first window; retries wait the exact retry-after-ms"
    ),
    "kernel + openai, no limits (headers, shared pause)": (
        "first batch unpaced (nothing known yet), then the headers"
    ),
}


def _server_stats(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as answer:
        stats: dict[str, int] = json.loads(answer.read())
    return stats


# ---------------------------------------------------------------- the clients


def _sdk_alone(base_url: str) -> tuple[float, int]:
    return asyncio.run(_sdk_batches(base_url))


async def _sdk_batches(base_url: str) -> tuple[float, int]:
    import openai

    client = openai.AsyncOpenAI(base_url=base_url, api_key="sk-reference", max_retries=3)
    context = requests_for(1)[0].context

    async def agent(i: int) -> bool:
        try:
            await client.chat.completions.create(
                model="fake-model",
                messages=[{"role": "user", "content": context.topic_content}],
                extra_headers={"X-Conclave-Agent": f"archon-{i}"},
            )
        except openai.APIError:
            return False
        return True

    try:
        t0 = time.perf_counter()
        failed = 0
        for _ in range(BATCHES):
            done = await asyncio.gather(*(agent(i) for i in range(AGENTS)))
            failed += done.count(False)
        return time.perf_counter() - t0, failed
    finally:
        await client.close()


def _kernel_no_limits(base_url: str) -> tuple[float, int]:
    return trio.run(_kernel_batches, base_url, None)


def _kernel_with_limits(base_url: str) -> tuple[float, int]:
    return trio.run(_kernel_batches, base_url, round(LIMIT * 60 / WINDOW_S))


async def _kernel_batches(base_url: str, rpm: int | None) -> tuple[float, int]:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator, ProviderLimits

    limits = ProviderLimits(requests_per_minute=rpm) if rpm else None
    orchestrator = OpenAIChatOrchestrator(
        base_url, "fake-model", api_key="sk-kernel", limits=limits, timeout_s=30
    )
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        t0 = time.perf_counter()
        failed = 0
        for _ in range(BATCHES):
            result = await service.invoke_concurrent(requests_for(AGENTS))
            failed += result.failure_count
        return time.perf_counter() - t0, failed
