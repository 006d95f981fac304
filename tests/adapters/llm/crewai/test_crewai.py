"""Real CrewAI agents through the trio-asyncio bridge against the loopback server.

Nothing here mocks crewai or the openai client: every agent is a crewai ``Agent`` running
a crewai ``Task``, every request crosses real HTTP to tests/support/fake_openai.py, which injects
the faults and counts what is in flight and who went away.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import trio

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.crewai import TELEMETRY_OFF, CrewAIOrchestrator
from adapters.llm.provider_budget import ProviderLimits
from adapters.roster import AgentProfile, Roster
from adapters.valkey import ValkeyProviderBudget
from kernel import (
    MAX_TOPIC_BYTES,
    AgentInvocationError,
    AgentNotFoundError,
    AgentPool,
    ConcurrentDeliberationService,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.adapters.llm.crewai.conftest import threads_running_llm_code
from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import PeakRss, client_bytes, expect_halt
from tests.support.valkey_server import ValkeyServer

ARCHONS = ROOT / "examples" / "archons-sample.json"
FAST: dict[str, Any] = {"backoff_base_s": 0.001, "backoff_cap_s": 0.005, "timeout_s": 5.0}
TOPIC = ContextBundle("budget-7", "Adopt the budget?", {"session": "42"})


def orchestrator(
    server: FakeOpenAIServer, roster: Roster | int = 1, **kwargs: Any
) -> CrewAIOrchestrator:
    council = Roster.default(roster) if isinstance(roster, int) else roster
    return CrewAIOrchestrator(
        council, base_url=server.base_url, model="fake-model", **{**FAST, **kwargs}
    )


async def wait_server(server: FakeOpenAIServer, predicate: Any, limit_s: float = 10.0) -> None:
    """Block (in a worker thread) until the server's counters satisfy ``predicate``."""
    ok = await trio.to_thread.run_sync(server.wait_for, predicate, limit_s)
    assert ok, "server never reached the expected state"


def crewai_threads() -> list[str]:
    """CrewAI's own event-bus threads (its listeners run there), if any were started."""
    return [t.name for t in threading.enumerate() if t.name.startswith("CrewAI")]


# ------------------------------------------------------------------ a council of 72


async def test_72_crewai_agents_in_flight_at_once(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = "barrier"  # nobody is answered until all 72 are waiting
    llm_server.barrier_size = 72
    roster = Roster.default(72)
    pool = AgentPool()
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster)) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), pool)
        result = await service.invoke_concurrent(roster.requests(TOPIC))
        assert crewai_threads() == []  # CrewAI's event bus never started its threads
    assert result.success_count == 72, result.failures[:3]
    assert llm_server.max_in_flight == 72 and llm_server.requests_total == 72
    out = result.outputs[0]
    assert out.content.startswith("archon-1 votes aye")  # the agent's final answer
    meta = out.metadata
    assert meta["framework"] == "crewai" and meta["model"] == "fake-model"
    assert meta["prompt_tokens"] == 11 and meta["completion_tokens"] == 5
    assert meta["total_tokens"] == 16 and meta["successful_requests"] == 1
    assert meta["attempts"] == 1 and meta["role"] == "archon-1"
    body = llm_server.bodies[0]
    system, user = body["messages"]
    assert system["role"] == "system" and "Your personal goal is:" in system["content"]
    assert "Adopt the budget?" in user["content"] and "session: 42" in user["content"]
    assert "Current Task:" in user["content"]  # CrewAI's task prompt, not ours
    assert pool.active_count == 0


async def test_a_second_batch_reuses_the_agents_and_counts_its_own_usage(
    llm_server: FakeOpenAIServer,
) -> None:
    roster = Roster.default(3)
    orch = orchestrator(llm_server, roster)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge)
        first = await service.invoke_concurrent(roster.requests(TOPIC))
        second = await service.invoke_concurrent(roster.requests(ContextBundle("t2", "Again?")))
    assert first.success_count == second.success_count == 3
    # Usage is the call's own (a delta of the LLM's lifetime counters), not cumulative.
    assert {o.metadata["total_tokens"] for o in second.outputs} == {16}
    assert "Again?" in llm_server.bodies[-1]["messages"][1]["content"]


# ------------------------------------------------------------------ faults, per agent

FAULTS: dict[str, tuple[tuple[Any, ...], FailureKind | None, str, int]] = {
    # agent: (faults in order, failure kind or None for success, message part, attempts)
    "ok": ((), None, "", 1),
    "flaky-500": ((500,), None, "", 2),
    "rate-limited": ((("429", 0.2),), None, "", 2),
    "dropped": (("drop",), None, "", 2),
    "down-503": ((503, 503, 503, 503), FailureKind.ERROR, "HTTP 503 after 4 attempt(s)", 4),
    "bad-key": ((401,), FailureKind.ERROR, "HTTP 401 (authentication failed", 1),
    "bad-request": ((400,), FailureKind.ERROR, "HTTP 400 (injected 400); not retried", 1),
    "out-of-quota": ((("quota", 20),), FailureKind.ERROR, "429: the account is out of quota", 1),
    "garbled": (("malformed_json",), FailureKind.ERROR, "malformed response", 1),
    "speechless": (("null_content",), FailureKind.ERROR, "malformed response (no content)", 1),
    "hung": (("hang",), FailureKind.TIMEOUT, "", 1),
}


async def test_faults_give_each_agent_its_own_outcome(llm_server: FakeOpenAIServer) -> None:
    roster = Roster([AgentProfile(agent_id) for agent_id in FAULTS])
    for agent_id, (faults, *_rest) in FAULTS.items():
        llm_server.script(agent_id, *faults)
    pool = AgentPool()
    orch = orchestrator(llm_server, roster, max_retries=3, timeout_s=30)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, pool=pool, agent_timeout=1.0)
        t0 = time.monotonic()
        result = await service.invoke_concurrent(roster.requests(TOPIC))
        elapsed = time.monotonic() - t0
    assert result.total_count == len(FAULTS)
    outputs = {o.agent_id: o for o in result.outputs}
    failures = {f.agent_id: f for f in result.failures}
    for agent_id, (_faults, kind, message, attempts) in FAULTS.items():
        assert llm_server.attempts[agent_id] == attempts, agent_id
        if kind is None:
            assert agent_id in outputs, failures.get(agent_id)
            assert outputs[agent_id].metadata["attempts"] == attempts
            assert outputs[agent_id].content.startswith(f"{agent_id} votes aye")
            continue
        failure = failures[agent_id]
        assert failure.kind is kind, (agent_id, failure)
        if kind is FailureKind.ERROR:
            assert failure.error_type == "AgentInvocationError"
            assert f"agent {agent_id!r} (CrewAI, fake-model at " in failure.message
            assert message in failure.message, failure.message
    assert elapsed >= 0.2  # the 429's Retry-After was waited for
    # the hung agent's request was closed when its timeout cancelled it
    await wait_server(llm_server, lambda s: s.disconnects == 1 and s.in_flight == 0)
    assert pool.active_count == 0


async def test_retry_after_is_capped(llm_server: FakeOpenAIServer) -> None:
    llm_server.script("archon-1", ("429", 30))
    orch = orchestrator(llm_server, retry_after_cap_s=0.3)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        t0 = time.monotonic()
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            Roster.default(1).requests(TOPIC)
        )
        waited = time.monotonic() - t0
    assert result.success_count == 1
    assert 0.3 <= waited < 30


# ------------------------------------------------------------------ halt and timeout


async def test_a_halt_closes_72_open_crewai_requests_at_once(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = "hang"
    roster = Roster.default(72)
    halt = HaltSwitch()
    pool = AgentPool()
    timing: dict[str, float] = {}
    in_flight: list[list[str]] = []
    after_halt: list[list[str]] = []
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster, timeout_s=600)) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, pool)

        async def halt_when_all_in_flight() -> None:
            await wait_server(llm_server, lambda s: s.in_flight == 72)
            in_flight.append(threads_running_llm_code())
            timing["halt"] = time.perf_counter()
            halt.halt("operator: stop the council")

        async def deliberate() -> None:
            try:
                await service.invoke_concurrent(roster.requests(TOPIC))
            finally:
                timing["returned"] = time.perf_counter()
                after_halt.append(threads_running_llm_code())

        err = await expect_halt(deliberate, halt_when_all_in_flight)
    # The halt, not a timeout (600 s), ended requests that would hang forever.  How fast
    # is the benchmark's business (milliseconds); the bound holds on a loaded machine.
    assert timing["returned"] - timing["halt"] < 5.0
    assert err.partial is not None and err.partial.failure_count == 72
    assert {f.kind for f in err.partial.failures} == {FailureKind.HALTED}
    assert pool.active_count == 0
    # 72 requests open at once, and no thread but trio's inside crewai, openai or httpx:
    # every request was awaiting on the event loop.  After the halt, still none.
    assert in_flight == [[]]
    assert after_halt == [[]]
    await wait_server(llm_server, lambda s: s.disconnects == 72 and s.in_flight == 0)
    assert llm_server.answered == 0


async def test_a_hanging_agent_times_out_and_its_request_is_closed(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.script("archon-2", "hang")
    roster = Roster.default(3)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster, timeout_s=600)) as bridge:
        service = ConcurrentDeliberationService(bridge, agent_timeout=0.5)
        result = await service.invoke_concurrent(roster.requests(TOPIC))
        assert threads_running_llm_code() == []
    assert [o.agent_id for o in result.outputs] == ["archon-1", "archon-3"]
    (failure,) = result.failures
    assert failure.agent_id == "archon-2" and failure.kind is FailureKind.TIMEOUT
    await wait_server(llm_server, lambda s: s.disconnects == 1 and s.in_flight == 0)


async def test_crewais_own_request_timeout_is_a_retried_timeout(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = "hang"
    orch = orchestrator(llm_server, timeout_s=0.2, max_retries=1)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            Roster.default(1).requests(TOPIC)
        )
    (failure,) = result.failures
    assert failure.kind is FailureKind.ERROR
    assert "timed out after 2 attempt(s)" in failure.message
    await wait_server(llm_server, lambda s: s.disconnects == 2)


async def test_a_hedge_sends_a_second_request_and_the_loser_is_closed(
    llm_server: FakeOpenAIServer,
) -> None:
    # Each batch: the agent's first request to arrive hangs, the second is answered (which
    # call arrives first is the machine's business: the assertions hold either way).
    roster = Roster.default(1)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster, timeout_s=600)) as bridge:
        service = ConcurrentDeliberationService(
            bridge, agent_timeout=10.0, hedge=HedgePolicy(delay=0.2, budget=1.0)
        )
        for batch in (1, 2):  # the second: both runners are free again
            llm_server.script("archon-1", "hang", "ok")
            result = await service.invoke_concurrent(roster.requests(TOPIC))
            assert result.success_count == 1, result.failures
            assert result.hedged_agents == ("archon-1",)
            (output,) = result.outputs
            assert output.content.startswith("archon-1 votes aye")
            assert output.metadata["attempts"] == 1 and output.metadata["total_tokens"] == 16
            # the loser's request was closed when the kernel cancelled it
            await wait_server(
                llm_server, lambda s, n=batch: s.disconnects == n and s.in_flight == 0
            )
            assert llm_server.attempts["archon-1"] == 2 * batch
            assert llm_server.answered == batch
        assert service.metrics.snapshot().hedges_launched == 2


# ------------------------------------------------------------------ who the agents are


async def test_archon_roster_agents_speak_as_their_profiles(llm_server: FakeOpenAIServer) -> None:
    roster = Roster.load(ARCHONS)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster)) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            roster.requests(TOPIC)
        )
    assert result.success_count == len(roster) == 6, result.failures
    by_agent = {
        h["x-conclave-agent"]: b for h, b in zip(llm_server.headers, llm_server.bodies, strict=True)
    }
    assert set(by_agent) == set(roster.agent_ids)
    vessa = roster.get("archon-vessa")
    assert vessa.system_prompt and vessa.backstory and vessa.goal
    system = by_agent["archon-vessa"]["messages"][0]
    assert system["role"] == "system"
    # the profile's system prompt first, then CrewAI's persona from role/backstory/goal
    assert system["content"].startswith(vessa.system_prompt + "\n\n")
    assert f"You are Keeper of the Treasury. {vessa.backstory}" in system["content"]
    assert f"Your personal goal is: {vessa.goal}" in system["content"]
    roles = {o.agent_id: o.metadata["role"] for o in result.outputs}
    assert roles["archon-orlen"] == "Warden of the Archive"


async def test_a_system_prompt_names_its_agent_as_the_openai_orchestrator_does(
    llm_server: FakeOpenAIServer,
) -> None:
    template = 'You are {name} ({agent_id}). Answer as {"vote": "..."}.'
    roster = Roster(
        [AgentProfile("a-1", display_name="Skeptic", system_prompt=template, role="skeptic")]
    )
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster)) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            roster.requests(TOPIC)
        )
    assert result.success_count == 1, result.failures
    system = llm_server.bodies[0]["messages"][0]["content"]
    assert system.startswith('You are Skeptic (a-1). Answer as {"vote": "..."}.\n\n')


async def test_the_final_answer_is_what_crewai_parses_out(llm_server: FakeOpenAIServer) -> None:
    llm_server.script("archon-1", ("reply", "Thought: weigh it.\nFinal Answer: Aye, fund it."))
    # a tool call from an agent with no tools: asked once more for its final answer
    llm_server.script(
        "archon-2",
        ("reply", "Thought: look it up\nAction: search\nAction Input: budget"),
        ("reply", "Final Answer: Nay."),
    )
    roster = Roster.default(2)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster)) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            roster.requests(TOPIC)
        )
    contents = {o.agent_id: o.content for o in result.outputs}
    assert contents == {"archon-1": "Aye, fund it.", "archon-2": "Nay."}
    second = [
        b
        for h, b in zip(llm_server.headers, llm_server.bodies, strict=True)
        if h["x-conclave-agent"] == "archon-2"
    ][1]
    assert second["messages"][-1]["role"] == "user"
    assert "final answer" in second["messages"][-1]["content"].lower()
    assert result.outputs[1].metadata["successful_requests"] == 2


async def test_settings_and_per_agent_overrides_reach_the_server(
    llm_server: FakeOpenAIServer,
) -> None:
    roster = Roster(
        [
            AgentProfile("a", model="model-a", temperature=0.1, max_tokens=64),
            AgentProfile("b"),
        ]
    )
    orch = orchestrator(llm_server, roster, temperature=0.9, max_tokens=32)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(roster.requests(TOPIC))
        stranger = await service.invoke_concurrent(Roster.default(1).requests(TOPIC))
    assert result.success_count == 2
    by_agent = {
        h["x-conclave-agent"]: b for h, b in zip(llm_server.headers, llm_server.bodies, strict=True)
    }
    a, b = by_agent["a"], by_agent["b"]
    assert a["model"] == "model-a" and a["temperature"] == 0.1 and a["max_tokens"] == 64
    assert b["model"] == "fake-model" and b["temperature"] == 0.9 and b["max_tokens"] == 32
    assert result.outputs[0].metadata["model"] == "model-a"
    (failure,) = stranger.failures
    assert failure.error_type == "AgentNotFoundError"


async def test_the_api_key_is_sent_but_never_shown(
    llm_server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-test-SECRET-0123456789"
    llm_server.script("archon-2", 401)
    llm_server.script("archon-1", 500)  # retried: CrewAI logs it to the root logger
    orch = orchestrator(llm_server, 2, api_key=secret)
    assert secret not in repr(orch)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            Roster.default(2).requests(TOPIC)
        )
    assert {h["authorization"] for h in llm_server.headers} == {f"Bearer {secret}"}
    (failure,) = result.failures
    assert secret not in failure.message
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert secret not in logged
    # CrewAI logs the server's error body (providers echo keys in it) on the root logger:
    # kept out while the orchestrator is open; the agent's failure says what happened.
    assert [r.getMessage() for r in caplog.records if r.name == "root"] == []
    assert "agent failed" in logged  # the kernel's own record (ids and kinds only)


# ------------------------------------------------------------------ set-up, and no sync path


async def test_entering_the_bridge_builds_every_agent_off_the_loop_without_a_request(
    llm_server: FakeOpenAIServer,
) -> None:
    orch = orchestrator(llm_server, 4)
    prepared_in: list[threading.Thread] = []
    prepare = orch.prepare

    def recording_prepare() -> None:
        prepared_in.append(threading.current_thread())
        prepare()

    orch.prepare = recording_prepare  # type: ignore[method-assign]
    async with AsyncioOrchestratorBridge(orch) as bridge:
        assert prepared_in and prepared_in[0] is not threading.main_thread()
        assert llm_server.requests_total == 0  # no network call on entry
        # two agents per member (a call and its hedge), each with its own executor
        agents = {
            (a, i): r.agent for a, m in orch._members.items() for i, r in enumerate(m.runners)
        }
        assert len(agents) == 8 and len({id(agent) for agent in agents.values()}) == 8
        executors = {key: agent.agent_executor for key, agent in agents.items()}
        assert all(type(e).__name__ == "AsyncioAgentExecutor" for e in executors.values())
        assert len({id(e) for e in executors.values()}) == 8
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            Roster.default(4).requests(TOPIC)
        )
        assert result.success_count == 4
        # the batch built no agent and no executor
        now = {(a, i): r.agent for a, m in orch._members.items() for i, r in enumerate(m.runners)}
        assert now == agents
        assert all(agents[key].agent_executor is e for key, e in executors.items())
        clients = list(orch._clients)
        assert len({id(c) for c in clients}) == 4  # a connection pool per agent
    assert orch._members == {}
    assert all(c.is_closed for c in clients)  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError, match="not open"):
        await orch.invoke("archon-1", TOPIC)


async def test_the_synchronous_paths_are_refused(llm_server: FakeOpenAIServer) -> None:
    from crewai.llms.providers.openai.completion import OpenAICompletion

    orch = orchestrator(llm_server, 1)
    async with AsyncioOrchestratorBridge(orch):
        for runner in orch._members["archon-1"].runners:
            # CrewAI's native OpenAI provider (not LiteLLM), with its own retries off
            assert isinstance(runner.llm, OpenAICompletion) and not runner.llm.is_litellm
            assert runner.llm.max_retries == 0 and runner.agent.max_retry_limit == 0
            with pytest.raises(RuntimeError, match="asyncio only"):
                runner.llm.call("hello")  # CrewAI's synchronous LLM call: no client to make it
            with pytest.raises(RuntimeError, match="asyncio only"):
                runner.agent.agent_executor.invoke({"input": "hello"})  # type: ignore[union-attr]
    assert llm_server.requests_total == 0


def test_bad_arguments_are_refused_before_anything_is_built() -> None:
    roster = Roster.default(1)
    with pytest.raises(InvalidRequestError, match="roster must be a Roster"):
        CrewAIOrchestrator(["archon-1"], base_url="http://x/v1", model="m")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="base_url"):
        CrewAIOrchestrator(roster, base_url="localhost:8080", model="m")
    with pytest.raises(InvalidRequestError, match="model"):
        CrewAIOrchestrator(roster, base_url="http://x/v1", model=" ")
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        CrewAIOrchestrator(roster, base_url="http://x/v1", model="m", timeout_s=0)
    with pytest.raises(InvalidRequestError, match="max_retries"):
        CrewAIOrchestrator(roster, base_url="http://x/v1", model="m", max_retries=-1)
    with pytest.raises(InvalidRequestError, match="telemetry"):
        CrewAIOrchestrator(roster, base_url="http://x/v1", model="m", telemetry="no")  # type: ignore[arg-type]
    with pytest.raises(AgentNotFoundError):
        roster.get("archon-2")


# ------------------------------------------------------------------ telemetry


async def test_telemetry_off_detaches_crewais_listeners_while_open(
    llm_server: FakeOpenAIServer,
) -> None:
    from crewai.events.event_bus import crewai_event_bus

    def handler_count() -> int:
        return sum(len(h) for h in crewai_event_bus._sync_handlers.values())

    attached = handler_count()
    assert attached > 0  # CrewAI's console, telemetry and trace listeners
    first, second = orchestrator(llm_server, 1), orchestrator(llm_server, 1)
    async with AsyncioOrchestratorBridge(first) as bridge:
        assert handler_count() == 0
        async with AsyncioOrchestratorBridge(second):
            assert handler_count() == 0
        assert handler_count() == 0  # still open: `first` keeps them detached
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            Roster.default(1).requests(TOPIC)
        )
        assert result.success_count == 1
    assert handler_count() == attached  # given back, once
    for name, value in TELEMETRY_OFF.items():
        assert os.environ[name] == value


async def test_telemetry_true_leaves_crewai_as_it_is(
    llm_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from crewai.events.event_bus import crewai_event_bus

    for name in TELEMETRY_OFF:
        monkeypatch.delenv(name, raising=False)
    attached = sum(len(h) for h in crewai_event_bus._sync_handlers.values())
    orch = orchestrator(llm_server, 1, telemetry=True)
    async with AsyncioOrchestratorBridge(orch):
        assert sum(len(h) for h in crewai_event_bus._sync_handlers.values()) == attached
    assert not set(TELEMETRY_OFF) & set(os.environ)


def run_probe(
    server: FakeOpenAIServer, out: Path, *flags: str
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """telemetry_probe.py (beside this module) in a fresh interpreter without CrewAI's
    switches."""
    env = {k: v for k, v in os.environ.items() if k not in TELEMETRY_OFF}
    env.pop("CONCLAVE_CREWAI_TESTS", None)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.adapters.llm.crewai.telemetry_probe",
            server.base_url,
            str(out),
            *flags,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report: dict[str, Any] = json.loads(out.read_text())
    return proc, report


def test_a_fresh_process_sends_nothing_prints_nothing_and_sets_up_on_entry(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """A fresh interpreter, no CrewAI switches in its environment: a deliberation with the
    default orchestrator leaves CrewAI's telemetry unbuilt, opens no connection beyond
    127.0.0.1 (an audit hook in the child records every attempt), prints nothing, and
    its first batch imports no module (crewai, the SDK's resources: all on entry)."""
    proc, report = run_probe(llm_server, tmp_path / "report.json")
    assert proc.stdout == ""  # no CrewAI console panel (they print the topic), ever
    assert report["env_before_import"] == dict(TELEMETRY_OFF)
    assert report["success_count"] == 3
    assert report["modules_imported_in_first_batch"] == []
    assert report["telemetry_ready"] is False
    assert report["litellm_loaded"] is False  # CrewAI's native OpenAI provider, no LiteLLM
    assert report["off_machine"] == []
    assert report["crewai_threads"] == []


def test_telemetry_true_runs_with_crewais_listeners_and_telemetry_on(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Opting in works under trio-asyncio: CrewAI's event bus (started in the set-up's
    worker thread, on a plain asyncio loop) runs its listeners, its telemetry is built."""
    _proc, report = run_probe(llm_server, tmp_path / "report.json", "--telemetry")
    assert set(report["env_before_import"].values()) == {None}  # the environment untouched
    assert report["success_count"] == 3
    assert report["telemetry_ready"] is True
    assert "CrewAIEventsLoop" in report["crewai_threads"]
    assert report["off_machine"] == []  # nothing sent while the test looked (hook refuses)


def test_crewais_stock_executor_leaves_the_request_open_in_a_thread(tmp_path: Path) -> None:
    """The trap this adapter avoids, on the installed crewai (crewAI issue 6683), and
    proof that the thread check above can fail: with CrewAI's default executor,
    cancelling the agent's asyncio task returns while a worker thread is still in the
    synchronous client and the request is still open, until the client's own timeout.

    In a fresh interpreter (stock_executor_probe.py, beside this module): CrewAI's flow
    machinery starts event-bus threads that would outlive the test.
    """
    out = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.adapters.llm.crewai.stock_executor_probe", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["cancelled"] is True
    assert report["threads_in_llm_code_after_cancel"] != []  # a thread still in the client
    assert report["in_flight_after_cancel"] == 1 and report["disconnects_after_cancel"] == 0
    assert report["seconds_until_closed"] >= 0.5  # closed by the client's 1 s timeout only


def test_a_crewai_validation_error_is_described_without_its_input() -> None:
    from pydantic import BaseModel, ValidationError

    from adapters.llm._crewai_agents import describe_error

    class Vote(BaseModel):
        count: int

    with pytest.raises(ValidationError) as info:
        Vote(count="the council's secret deliberation")  # type: ignore[arg-type]
    described = describe_error(info.value)
    assert described == "ValidationError (1 error(s))"
    long_error = RuntimeError("x" * 1000 + "\n" + "y")
    assert describe_error(long_error) == "RuntimeError: " + "x" * 200  # one bounded line


async def test_agents_on_one_topic_share_its_task_description(
    llm_server: FakeOpenAIServer,
) -> None:
    # CrewAI copies the description into its prompt and its messages, and the SDK encodes
    # each body: three copies per agent are CrewAI's and the SDK's; the description
    # itself is built once per topic (it was a fourth copy per agent).
    n = 8
    llm_server.default = "hang"
    roster = Roster.default(n)
    context = ContextBundle("big", "a" * MAX_TOPIC_BYTES)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster)) as bridge:
        gc.collect()
        tracemalloc.start()
        try:
            before = client_bytes()
            async with trio.open_nursery() as nursery:
                for agent_id in roster.agent_ids:
                    nursery.start_soon(bridge.invoke, agent_id, context)
                await wait_server(llm_server, lambda s: s.requests_total >= n)
                held = client_bytes() - before
                nursery.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
    per_agent = held / n / MAX_TOPIC_BYTES
    assert per_agent < 3.6, f"{per_agent:.2f} x the topic per agent"  # was 4.07


# ------------------------------------------------------------------ a hostile server

HOSTILE_TIMEOUT_S = 2.0
HOSTILE_MARGIN_S = 5.0  # generous: a loaded 2-core machine
BODY_CAP = "over the 8388608-byte cap"


async def run_hostile(server: FakeOpenAIServer, agents: int, **kwargs: Any) -> tuple[Any, float]:
    """One batch of ``agents`` CrewAI agents; the result and the batch's wall-clock time
    (building the agents not included); fails, rather than hangs, far past the timeout."""
    orch = orchestrator(server, agents, **{"timeout_s": HOSTILE_TIMEOUT_S, **kwargs})
    with trio.fail_after(60):
        async with AsyncioOrchestratorBridge(orch) as bridge:
            started = time.monotonic()
            result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
                Roster.default(agents).requests(TOPIC)
            )
            elapsed = time.monotonic() - started
    return result, elapsed


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (("trickle", 0.5), "timed out after 1 attempt(s)"),
        (("continue_storm", 0.002), "timed out after 1 attempt(s)"),
        (("huge_body", 300 * 2**20), f"{BODY_CAP} on the wire (max_response_bytes); not retried"),
        (("gzip_bomb", 2**30), f"{BODY_CAP} inflated (max_response_bytes); not retried"),
        (("deflate_bomb", 2**30), f"{BODY_CAP} inflated (max_response_bytes); not retried"),
        # A streaming client reads endless events as they come: the deadline or the cap,
        # whichever comes first (CrewAI reads events slower than the loopback sends them).
        ("endless_sse", ("timed out after 1 attempt(s)", f"{BODY_CAP} on the wire")),
        (("deep_json", 200_000), "malformed response"),
    ],
)
async def test_a_hostile_server_gives_each_crewai_agent_one_clear_failure_in_time(
    llm_server: FakeOpenAIServer, fault: Any, expected: str | tuple[str, ...]
) -> None:
    llm_server.default = fault
    with PeakRss() as rss:
        result, elapsed = await run_hostile(llm_server, 1, max_retries=0)
    (failure,) = result.failures
    assert failure.message.startswith("agent 'archon-1' (CrewAI, fake-model at ")
    outcomes = expected if isinstance(expected, tuple) else (expected,)
    assert any(e in failure.message for e in outcomes), failure.message
    assert elapsed < HOSTILE_TIMEOUT_S + HOSTILE_MARGIN_S
    assert rss.growth_mb < 150, f"{rss.growth_mb:.0f} MB"


async def test_72_crewai_agents_against_a_gzip_bomb_each_fail_alone_in_bounded_memory(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("gzip_bomb", 2**30)
    timeout_s = 10.0  # 72 CrewAI agents on 2 busy cores: no first attempt may time out
    with PeakRss() as rss:
        result, elapsed = await run_hostile(llm_server, 72, timeout_s=timeout_s)
    assert len(result.failures) == 72
    assert all(BODY_CAP in f.message for f in result.failures)
    assert llm_server.requests_total == 72  # refused, not retried
    assert elapsed < timeout_s + HOSTILE_MARGIN_S, elapsed
    assert rss.growth_mb < 400, f"{rss.growth_mb:.0f} MB"


async def test_a_redirect_is_refused_and_the_other_origin_sees_nothing(
    llm_server: FakeOpenAIServer,
) -> None:
    other = FakeOpenAIServer().start()
    try:
        llm_server.default = ("redirect", f"{other.base_url}/chat/completions?k=s3cret")
        result, _ = await run_hostile(llm_server, 1)
        assert other.requests_total == 0
    finally:
        other.stop()
    (failure,) = result.failures
    assert f"HTTP 307 redirect to {other.base_url}/chat/completions?k=*** refused" in (
        failure.message
    ), failure.message
    assert "s3cret" not in failure.message
    assert llm_server.attempts["archon-1"] == 1


async def test_an_answer_over_the_content_cap_is_refused(llm_server: FakeOpenAIServer) -> None:
    llm_server.default = ("reply", "a" * 101)
    result, _ = await run_hostile(llm_server, 1, max_content_chars=100)
    (failure,) = result.failures
    assert failure.message.endswith("answer over the 100-character cap (max_content_chars)")


def test_the_contract_path_adapters_crewai_re_exports_the_module_without_a_warning() -> None:
    import importlib
    import sys
    import warnings

    import adapters.llm.crewai as new

    sys.modules.pop("adapters.crewai", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        old = importlib.import_module("adapters.crewai")
    assert old.CrewAIOrchestrator is new.CrewAIOrchestrator
    assert old.__all__ == new.__all__


# ------------------------------------------------------------------ streaming


async def test_a_halt_with_72_crewai_streams_open_stops_the_servers_generation(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("generate", 200, 100.0)  # 2 s of tokens each
    roster = Roster.default(72)
    halt = HaltSwitch()
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster, timeout_s=600)) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, AgentPool())

        async def halt_when_all_generate() -> None:
            await wait_server(llm_server, lambda s: s.generating == 72)
            halt.halt("operator: stop the council")

        await expect_halt(
            lambda: service.invoke_concurrent(roster.requests(TOPIC)), halt_when_all_generate
        )
    await wait_server(llm_server, lambda s: s.generating == 0)
    assert all(g.streaming for g in llm_server.generations)
    # Each server-side generation stopped at its next token at the latest.
    assert max(g.after_gone for g in llm_server.generations) <= 2


async def test_a_crewai_stream_cut_short_is_a_failure_not_a_truncated_answer(
    llm_server: FakeOpenAIServer,
) -> None:
    # Finish and usage chunks, then the body ends without [DONE]: CrewAI's reader (the
    # SDK's) takes that as the end; the HTTP guard does not.
    llm_server.default = ("stream_no_done", 3)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, max_retries=1)) as bridge:
        with pytest.raises(AgentInvocationError, match="connection failed after 2 attempt"):
            await bridge.invoke("archon-1", TOPIC)


async def test_crewai_streams_its_calls_with_usage_unless_told_not_to(
    llm_server: FakeOpenAIServer,
) -> None:
    for stream in (True, False):
        llm_server.reset()
        llm_server.default = ("reply", "Thought: done\nFinal Answer: aye, adopt it")
        async with AsyncioOrchestratorBridge(orchestrator(llm_server, stream=stream)) as bridge:
            output = await bridge.invoke("archon-1", TOPIC)
        assert output.content == "aye, adopt it"
        assert output.metadata["total_tokens"] == 16
        body = llm_server.bodies[0]
        assert body.get("stream", False) is stream
        assert ("stream_options" in body) is stream


async def test_each_http_calls_status_is_in_the_answers_or_the_errors_metadata(
    llm_server: FakeOpenAIServer,
) -> None:
    roster = Roster([AgentProfile("throttled"), AgentProfile("down")])
    llm_server.script("throttled", ("429", 0))
    llm_server.script("down", 503, 503)
    orch = orchestrator(llm_server, roster, max_retries=1, timeout_s=30)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        output = await bridge.invoke("throttled", TOPIC)
        with pytest.raises(AgentInvocationError) as failed:
            await bridge.invoke("down", TOPIC)
    assert output.metadata["http_statuses"] == "429 200"
    assert output.metadata["model"] == "fake-model"
    assert failed.value.metadata["http_statuses"] == "503 503"
    assert failed.value.metadata["http_status"] == "503"
    assert failed.value.metadata["model"] == "fake-model"
    assert failed.value.metadata["attempts"] == 2


# ------------------------------------------------------------------ the provider budget

W = 1.0  # the loopback server's "minute", 60 times faster


async def test_crewai_agents_under_an_rpm_limit_never_exceed_it_and_meet_no_429(
    llm_server: FakeOpenAIServer,
) -> None:
    # Requests per window of W seconds (2400 per real minute); the pacing's 5 % headroom is
    # two requests, room for a loaded machine's jitter.
    n = 40
    llm_server.limit_rate(n, 10**7, W)
    key = f"sk-crewai-{os.getpid()}-{time.monotonic_ns()}"  # a budget of its own
    limits = ProviderLimits(requests_per_minute=round(n * 60 / W))
    orch = orchestrator(llm_server, 72, api_key=key, limits=limits)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        result = await service.invoke_concurrent(Roster.default(72).requests(TOPIC))
    assert result.success_count == 72, result.failures[:3]
    assert llm_server.rate_limited == 0  # every call waited for its turn, none was refused
    times = sorted(t for t, _key, status in llm_server.arrivals if status == 200)
    assert len(times) == 72
    busiest, start = 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - W:
            start += 1
        busiest = max(busiest, end - start + 1)
    assert busiest <= n  # never more than the limit in any of the server's windows
    waited = [float(o.metadata["rate_limited_ms"]) for o in result.outputs]
    assert sum(w > 0 for w in waited) >= 72 - n  # all but the first window's waited
    stats = orch.limit_stats()
    assert (stats.attempts, stats.responses_429) == (72, 0)
    assert stats.waited_ms == pytest.approx(sum(waited), rel=1e-3, abs=1)


@pytest.mark.slow
async def test_crewai_agents_waiting_for_shared_budget_turns_end_at_once_on_a_halt(
    llm_server: FakeOpenAIServer, valkey_server: ValkeyServer
) -> None:
    """Two replicas' CrewAI councils share one budget of 60 requests a minute on Valkey:
    together they keep to it, and a halt ends the agents still waiting for turns at once
    (none of them sends)."""
    key = f"sk-crewai-shared-{os.getpid()}-{time.monotonic_ns()}"
    prefix = f"crewai-{time.monotonic_ns()}"
    halt = HaltSwitch()
    async with (
        ValkeyProviderBudget(valkey_server.url, key_prefix=prefix, replicas=2) as one,
        ValkeyProviderBudget(valkey_server.url, key_prefix=prefix, replicas=2) as other,
    ):
        councils = [
            orchestrator(
                llm_server, 5, api_key=key,
                limits=ProviderLimits(requests_per_minute=60, shared=store),
            )
            for store in (one, other)
        ]  # fmt: skip
        async with (
            AsyncioOrchestratorBridge(councils[0]) as first,
            AsyncioOrchestratorBridge(councils[1]) as second,
        ):
            services = [
                ConcurrentDeliberationService(bridge, halt, AgentPool())
                for bridge in (first, second)
            ]
            errors: list[SystemHaltedError] = []

            async def run(service: ConcurrentDeliberationService) -> None:
                try:
                    await service.invoke_concurrent(Roster.default(5).requests(TOPIC))
                except SystemHaltedError as exc:
                    errors.append(exc)

            async def halt_after_two() -> None:
                # One a second across both: the second request ~1 s after the first.
                await wait_server(llm_server, lambda s: s.answered >= 2)
                halt.halt("operator: stop")

            with trio.fail_after(8):  # the remaining turns would take 8 s
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(run, services[0])
                    nursery.start_soon(run, services[1])
                    nursery.start_soon(halt_after_two)
    assert len(errors) == 2
    halted = [f for e in errors if e.partial for f in e.partial.failures]
    assert sum(f.kind is FailureKind.HALTED for f in halted) >= 7
    times = sorted(t for t, _key, status in llm_server.arrivals if status == 200)
    assert len(times) <= 3  # at most the one whose turn came as the halt did
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times))  # shared pace


def test_limits_that_are_not_provider_limits_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="limits must be a ProviderLimits"):
        CrewAIOrchestrator(
            Roster.default(1),
            base_url="http://127.0.0.1:9/v1",
            model="m",
            limits=600,  # type: ignore[arg-type]
        )


def test_inside_an_asyncio_host_crewai_agents_run_on_its_loop_and_a_halt_closes_them(
    llm_server: FakeOpenAIServer,
) -> None:
    """Through AsyncioHost (the kernel as a trio guest of an asyncio application), the
    same guarantees: 72 agents answer, and a halt closes their 72 open requests."""
    import asyncio

    from adapters.asyncio_host import AsyncioHost

    roster = Roster.default(72)

    async def main() -> None:
        llm = orchestrator(llm_server, roster, timeout_s=600)
        async with AsyncioHost(AsyncioOrchestratorBridge(llm)) as host:
            answered = await host.invoke_concurrent(roster.requests(TOPIC))
            assert answered.success_count == 72
            llm_server.default = "hang"
            deliberation = host.start(roster.requests(TOPIC))
            reached = await asyncio.to_thread(llm_server.wait_for, lambda s: s.in_flight == 72)
            assert reached, "72 requests never open at once"
            host.halt("operator: stop the council")
            with pytest.raises(SystemHaltedError) as caught:
                await deliberation.result()
        assert caught.value.partial is not None
        assert {f.kind for f in caught.value.partial.failures} == {FailureKind.HALTED}

    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        runner.run(main())
    assert llm_server.wait_for(lambda s: s.disconnects == 72 and s.in_flight == 0)
