"""Provider rate limits over real HTTP: the openai SDK, through the bridge, against the
loopback server in rate-limited mode (tests/support/fake_openai.py; nothing patches the client).

The server's "minute" is a window of W = 1 s (time-scaled), and it enforces its limits
per API key; each test uses a key of its own, so each gets a budget of its own.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import subprocess
import uuid
from typing import Any

import pytest
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator, ProviderLimits
from adapters.llm.provider_budget import HEADROOM, shared_budget
from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    FailureKind,
    HaltSwitch,
)
from tests.support.cli import conclave as run_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import make_requests, time_halt

W = 1.0  # the server's window: its "minute"
N = 120  # requests per window
RPM = round(N * 60 / W)  # the same limit, per minute, as a client configures it
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.2, "timeout_s": 10.0}


def orchestrator(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIChatOrchestrator:
    """An orchestrator with an API key nobody else uses (a budget of its own)."""
    key = f"sk-test-{uuid.uuid4().hex}"
    return OpenAIChatOrchestrator(server.base_url, "fake-model", api_key=key, **FAST, **kwargs)


async def run_batches(
    orch: OpenAIChatOrchestrator, batches: int, size: int = 72
) -> list[ConcurrentResult]:
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        return [await service.invoke_concurrent(make_requests(size)) for _ in range(batches)]


def admitted(server: FakeOpenAIServer, key: str | None = None) -> list[float]:
    """Arrival times of the chat completions the server admitted (of one key)."""
    return sorted(t for t, k, status in server.arrivals if status == 200 and key in (None, k))


def rate(times: list[float]) -> float:
    """Requests per second from the first arrival to the last."""
    return (len(times) - 1) / (times[-1] - times[0])


def busiest_window(times: list[float]) -> int:
    """The most arrivals in any window of W seconds."""
    times, most, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - W:
            start += 1
        most = max(most, end - start + 1)
    return most


def outputs(results: list[ConcurrentResult]) -> list[AgentOutput]:
    return [o for r in results for o in r.outputs]


def key_of(orch: OpenAIChatOrchestrator) -> str:
    return f"Bearer {orch._api_key}"


async def test_with_the_servers_limits_no_call_is_refused(llm_server: FakeOpenAIServer) -> None:
    llm_server.limit_rate(N, 10**7, W)
    orch = orchestrator(llm_server, limits=ProviderLimits(requests_per_minute=RPM))
    results = await run_batches(orch, 3)

    assert [r.success_count for r in results] == [72, 72, 72]
    assert llm_server.rate_limited == 0
    times = admitted(llm_server)
    assert len(times) == 216
    # Never more than the server's limit in any of its windows.  (How close to the limit
    # the pacing runs is a speed, measured by the rate-limited benchmark, not here.)
    assert busiest_window(times) <= N
    waited = [float(o.metadata["rate_limited_ms"]) for o in outputs(results)]
    assert sum(w > 0 for w in waited) > 200  # nearly every agent waited its turn
    stats = orch.limit_stats()
    assert (stats.attempts, stats.responses_429) == (216, 0)
    assert stats.waited_ms == pytest.approx(sum(waited), rel=1e-3, abs=1)


async def test_without_limits_the_headers_and_the_shared_pause_keep_429s_rare(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.limit_rate(N, 10**7, W)
    orch = orchestrator(llm_server)  # no limits: only what the server says
    results = await run_batches(orch, 3)

    assert [r.success_count for r in results] == [72, 72, 72]  # every agent succeeds
    assert llm_server.rate_limited <= 5  # a handful, not a storm
    # The server admitted no more than its limit in any window (how close to it the
    # pacing runs is the rate-limited benchmark's business).
    assert busiest_window(admitted(llm_server)) <= N
    attempts = sum(int(o.metadata["attempts"]) for o in outputs(results))
    assert attempts == 216 + llm_server.rate_limited
    stats = orch.limit_stats()
    assert (stats.attempts, stats.responses_429) == (attempts, llm_server.rate_limited)


async def test_two_orchestrators_on_one_endpoint_and_key_share_one_budget(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.limit_rate(N, 10**7, W)
    limits = ProviderLimits(requests_per_minute=RPM)
    first = orchestrator(llm_server, limits=limits)
    second = OpenAIChatOrchestrator(
        llm_server.base_url, "fake-model", api_key=first._api_key, limits=limits, **FAST
    )
    results: list[ConcurrentResult] = []
    loops: list[object] = []

    async def council(orch: OpenAIChatOrchestrator, prefix: str) -> None:
        async with AsyncioOrchestratorBridge(orch) as bridge:  # each on a loop of its own
            loops.append(bridge._loop)
            service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
            results.append(await service.invoke_concurrent(make_requests(72, prefix=prefix)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(council, first, "a")
        nursery.start_soon(council, second, "b")

    assert loops[0] is not loops[1]
    assert [r.success_count for r in results] == [72, 72]
    # Each alone would take the whole limit: together they never exceeded it.
    assert llm_server.rate_limited == 0
    times = admitted(llm_server)
    assert len(times) == 144
    assert busiest_window(times) <= N
    assert rate(times) <= N / W


async def test_orchestrators_with_different_keys_do_not_share(
    llm_server: FakeOpenAIServer,
) -> None:
    per_key = 60
    llm_server.limit_rate(per_key, 10**7, W)  # per key
    limits = ProviderLimits(requests_per_minute=round(per_key * 60 / W))
    orchs = [orchestrator(llm_server, limits=limits) for _ in range(2)]

    async with trio.open_nursery() as nursery:
        for orch in orchs:
            nursery.start_soon(run_batches, orch, 1, 48)

    assert llm_server.rate_limited == 0
    for orch in orchs:
        assert len(admitted(llm_server, key_of(orch))) == 48
    # More in one window than one key's limit allows: two budgets, side by side.
    assert busiest_window(admitted(llm_server)) > per_key


async def test_a_429_pauses_every_agent_of_the_endpoint_until_the_reset(
    llm_server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters")
    llm_server.script_any(("429", 0.3))  # the first call: a plain 429, Retry-After 0.3 s
    # A turn every ~53 ms, so the others are still waiting when the 429 comes back.
    orch = orchestrator(llm_server, limits=ProviderLimits(requests_per_minute=1200))
    (result,) = await run_batches(orch, 1, size=6)

    assert result.success_count == 6
    (refused, first), *rest = sorted(llm_server.arrived)
    later = [t for t, _ in rest]
    assert len(later) == 6  # five others, and the refused one's retry
    assert min(later) >= refused + 0.3  # nobody fired into the pause
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert min(gaps) >= 0.5 / (20 * (1 - HEADROOM))  # and after it, still paced
    assert orch.limit_stats().responses_429 == 1
    output = next(o for o in result.outputs if o.agent_id == first)
    assert output.metadata["attempts"] == 2
    assert float(output.metadata["rate_limited_ms"]) >= 300
    (paused,) = [r for r in caplog.records if r.getMessage() == "endpoint paused after HTTP 429"]
    assert (paused.base_url, paused.pause_s) == (llm_server.base_url, 0.3)  # type: ignore[attr-defined]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert orch._api_key not in logged


async def test_a_halt_while_agents_wait_for_budget_is_prompt_and_consumes_nothing(
    llm_server: FakeOpenAIServer,
) -> None:
    # 60 a minute: one turn now, the next ~1.05 s later, the tenth ~9.5 s later.
    orch = orchestrator(llm_server, limits=ProviderLimits(requests_per_minute=60))
    budget = shared_budget(llm_server.base_url, orch._api_key)
    halt = HaltSwitch()
    second_turn: list[float] = []
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, AgentPool())

        async def while_waiting() -> None:
            await trio.to_thread.run_sync(llm_server.wait_for, lambda s: s.answered == 1)
            while budget.pending < 9:  # noqa: ASYNC110 (until the nine others reserved)
                await trio.sleep(0.001)
            # What the second turn would be if nobody else were waiting: turn 2 of the plan.
            second_turn.append(budget.turns()[0])

        err, took = await time_halt(
            lambda: service.invoke_concurrent(make_requests(10)), halt, while_waiting
        )

    assert took < 0.1  # prompt
    assert err.partial is not None
    assert [f.kind for f in err.partial.failures].count(FailureKind.HALTED) >= 9
    assert llm_server.requests_total == 1
    # Consumed nothing: the next turn is the one the second agent had, not the eleventh.
    assert budget.pending == 0
    assert budget.next_turn() == pytest.approx(second_turn[0], abs=0.01)


async def test_the_token_budget_is_settled_with_the_real_usage(
    llm_server: FakeOpenAIServer,
) -> None:
    tokens = 3000  # per window; the request limit is out of reach
    llm_server.limit_rate(10**6, tokens, W)
    orch = orchestrator(
        llm_server, max_tokens=50, limits=ProviderLimits(tokens_per_minute=tokens * 60)
    )
    (result,) = await run_batches(orch, 1)

    assert result.success_count == 72
    assert llm_server.rate_limited == 0
    used = [
        int(o.metadata["prompt_tokens"]) + int(o.metadata["completion_tokens"])
        for o in result.outputs
    ]
    assert sum(used) > 1.2 * tokens  # the token limit is what paced them
    # Each was reserved at its estimate (prompt + max_tokens, about twice what it used),
    # then settled: the throughput follows the usage, not the estimate.
    # Charged at the estimate, the batch could use at most about half the token rate;
    # settled, it runs near the full rate.  The bound sits between the two, with room
    # for a loaded machine (which only makes the batch slower, never faster).
    times = admitted(llm_server)
    token_rate = (sum(used) - used[0]) / (times[-1] - times[0])
    assert token_rate >= 0.6 * tokens / W


# ---------------------------------------------------------------- the CLI


def conclave(*args: str, key: str = "sk-cli") -> subprocess.CompletedProcess[str]:
    """The CLI with ``key`` as its API key (the server keeps a budget per key)."""
    return run_cli(*args, env={**os.environ, "OPENAI_API_KEY": key})


def test_the_cli_paces_at_rpm_and_reports_what_rate_limits_cost(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.limit_rate(60, 10**7, W)  # fewer than 72 a window: a burst would be refused
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", llm_server.base_url,
        "--model", "fake-model", "--rpm", str(round(60 * 60 / W)), "--quiet",
        key=f"sk-cli-{uuid.uuid4().hex}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "72/72 succeeded" in proc.stdout
    waited = re.search(
        r"rate limits: ([\d.]+) s waiting for budget \(all agents\), 0 x HTTP 429", proc.stdout
    )
    assert waited is not None, proc.stdout
    assert float(waited.group(1)) > 1.0  # 72 agents took turns over more than a second
    assert llm_server.rate_limited == 0


def test_the_cli_refuses_bad_rate_limits_before_running() -> None:
    proc = conclave("deliberate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                    "--model", "m", "--rpm", "0")  # fmt: skip
    assert proc.returncode == 2
    assert "--rpm: must be >= 1, got 0" in proc.stderr
    proc = conclave("deliberate", "--tpm", "1000")  # the stub backend has no provider
    assert proc.returncode == 2
    assert "--rpm and --tpm are the openai backend's" in proc.stderr
    assert "Traceback" not in proc.stderr
