"""Real LLM path: the openai SDK, through the trio-asyncio bridge, against a real server.

The server (tests/support/fake_openai.py) listens on 127.0.0.1 and injects faults per agent;
nothing here patches the client.  The bridge also waits for a cancelled asyncio task to
unwind, but not forever.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from typing import Any
from uuid import uuid4

import pytest
import trio
import trio.testing
import trio_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adapters.llm.bridge import AsyncioCancelledError, AsyncioOrchestratorBridge, _run
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.llm.provider_budget import shared_budget
from adapters.roster import AgentProfile, Roster, RosterError
from kernel import (
    AgentInvocationError,
    AgentNotFoundError,
    AgentOutput,
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import expect_halt, make_requests, time_halt

FAST: dict[str, Any] = {"backoff_base_s": 0.001, "backoff_cap_s": 0.005, "timeout_s": 5.0}


def orchestrator(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIChatOrchestrator:
    return OpenAIChatOrchestrator(server.base_url, "fake-model", **{**FAST, **kwargs})


async def wait_server(server: FakeOpenAIServer, predicate: Any, limit_s: float = 10.0) -> None:
    """Block (in a worker thread) until the server's counters satisfy ``predicate``."""
    ok = await trio.to_thread.run_sync(server.wait_for, predicate, limit_s)
    assert ok, "server never reached the expected state"


async def test_72_agents_in_flight_at_once_all_succeed(llm_server: FakeOpenAIServer) -> None:
    llm_server.default = "barrier"  # nobody is answered until all 72 are waiting
    llm_server.barrier_size = 72
    context = ContextBundle("budget-7", "Adopt the budget?", {"session": "42"})
    pool = AgentPool()
    # timeout_s bounds each attempt by the wall clock, and here every attempt waits for
    # the 72nd to arrive: room for a loaded machine, so that none is retried.
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, timeout_s=60.0)) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), pool)
        result = await service.invoke_concurrent(make_requests(72, context))
    assert result.success_count == 72, result.failures[:3]
    assert llm_server.max_in_flight == 72
    assert llm_server.requests_total == 72
    out = result.outputs[0]
    assert out.content.startswith("archon-1 votes aye")
    assert out.metadata["model"] == "fake-model"
    assert out.metadata["finish_reason"] == "stop"
    assert out.metadata["prompt_tokens"] == 11
    assert out.metadata["completion_tokens"] == 5
    assert out.metadata["attempts"] == 1
    body = llm_server.bodies[0]
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    assert "Adopt the budget?" in user and "session: 42" in user and "budget-7" in user
    assert pool.active_count == 0


@pytest.mark.parametrize(
    ("faults", "attempts"),
    [
        ((500,), 2),
        ((503, 503), 3),
        ((("429", 0),), 2),
        (("drop",), 2),
        (("drop", 500, ("429", 0)), 4),
        ((408,), 2),
    ],
)
async def test_retryable_faults_are_retried(
    llm_server: FakeOpenAIServer, faults: tuple[Any, ...], attempts: int
) -> None:
    llm_server.script("archon-1", *faults)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(make_requests(1))
    assert result.success_count == 1, result.failures
    assert result.outputs[0].metadata["attempts"] == attempts
    assert llm_server.attempts["archon-1"] == attempts


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (401, "HTTP 401 (authentication failed: check the API key); not retried"),
        (400, "HTTP 400 (injected 400); not retried"),
        (404, "HTTP 404"),
        ("malformed_json", "malformed response"),
        ("empty_choices", "malformed response (no choices)"),
        ("null_content", "malformed response (null content)"),
    ],
)
async def test_non_retryable_faults_fail_at_once(
    llm_server: FakeOpenAIServer, fault: Any, message: str
) -> None:
    llm_server.script("archon-1", fault)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, max_retries=3)) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(make_requests(1))
    (failure,) = result.failures
    assert failure.kind is FailureKind.ERROR
    assert failure.error_type == "AgentInvocationError"
    assert message in failure.message
    assert "'archon-1'" in failure.message
    assert llm_server.attempts["archon-1"] == 1


async def test_an_account_out_of_quota_fails_at_once_and_does_not_pause_the_endpoint(
    llm_server: FakeOpenAIServer,
) -> None:
    # OpenAI answers 429 for an exhausted quota too; no wait brings the quota back.
    for n in (1, 2, 3):
        llm_server.script(f"archon-{n}", ("quota", 20))
    key = f"sk-quota-{uuid.uuid4().hex}"
    orch = orchestrator(llm_server, api_key=key, max_retries=3, retry_after_cap_s=30)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(3))
    assert len(result.failures) == 3
    for failure in result.failures:
        assert failure.kind is FailureKind.ERROR
        assert f"agent {failure.agent_id!r}" in failure.message
        assert "HTTP 429" in failure.message and "out of quota" in failure.message
        assert "not retried" in failure.message and key not in failure.message
    assert dict(llm_server.attempts) == {"archon-1": 1, "archon-2": 1, "archon-3": 1}
    # Not a rate limit: the endpoint's other agents are not held back for its Retry-After.
    budget = shared_budget(llm_server.base_url, key)
    assert budget.paused_until == float("-inf")
    assert budget.next_turn() <= time.monotonic()
    assert orch.limit_stats().responses_429 == 0


async def test_persistent_5xx_gives_up_after_max_retries(llm_server: FakeOpenAIServer) -> None:
    llm_server.default = 500
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, max_retries=2)) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))
    assert "HTTP 500 after 3 attempt(s)" in result.failures[0].message
    assert llm_server.attempts["archon-1"] == 3


async def test_request_that_never_answers_times_out_and_is_retried(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = "hang"
    orch = orchestrator(llm_server, timeout_s=0.2, max_retries=1)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))
    assert "timed out after 2 attempt(s)" in result.failures[0].message
    await wait_server(llm_server, lambda s: s.disconnects == 2)


async def test_retry_after_is_honoured_and_capped(llm_server: FakeOpenAIServer) -> None:
    llm_server.script("archon-1", ("429", 30))
    orch = orchestrator(llm_server, retry_after_cap_s=0.3)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        t0 = time.monotonic()
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))
        waited = time.monotonic() - t0
    assert result.success_count == 1
    assert 0.3 <= waited < 30  # waited for Retry-After, but no longer than the cap


async def test_no_request_is_lost_under_mixed_faults(llm_server: FakeOpenAIServer) -> None:
    faults: list[Any] = [500, 503, ("429", 0), 401, "malformed_json", "empty_choices", "drop"]
    requests = make_requests(72)
    for i, req in enumerate(requests):
        if i % 3 == 0:
            llm_server.script(req.agent_id, faults[i % len(faults)])
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        pool = AgentPool()
        service = ConcurrentDeliberationService(bridge, pool=pool)
        result = await service.invoke_concurrent(requests)
    assert result.total_count == 72
    expected_failed = {
        r.agent_id
        for i, r in enumerate(requests)
        if i % 3 == 0 and faults[i % len(faults)] in (401, "malformed_json", "empty_choices")
    }
    assert set(result.failed_agents) == expected_failed
    assert pool.active_count == 0
    assert llm_server.in_flight == 0


async def test_halt_cancels_72_open_requests_down_to_the_socket(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = "hang"
    halt = HaltSwitch()
    pool = AgentPool()
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, timeout_s=600)) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, pool)
        err, took = await time_halt(
            lambda: service.invoke_concurrent(make_requests(72)),
            halt,
            lambda: wait_server(llm_server, lambda s: s.in_flight == 72),
        )
    assert err.partial is not None and err.partial.failure_count == 72
    assert {f.kind for f in err.partial.failures} == {FailureKind.HALTED}
    assert pool.active_count == 0
    # The halt, not a timeout (600 s), ended requests that would hang forever.  How fast
    # is the halt benchmark's business (milliseconds); the bound holds on a loaded machine.
    assert took < 5.0
    await wait_server(llm_server, lambda s: s.disconnects == 72)
    assert llm_server.answered == 0


async def test_unreachable_server_is_a_clear_failure() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    orch = OpenAIChatOrchestrator(
        f"http://127.0.0.1:{port}/v1",
        "m",
        max_retries=1,
        **{k: v for k, v in FAST.items() if k != "timeout_s"},
    )
    async with AsyncioOrchestratorBridge(orch) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))
        with pytest.raises(AgentInvocationError, match="cannot reach"):
            await bridge.run_asyncio(orch.check_reachable, 1)
    assert "connection failed after 2 attempt(s)" in result.failures[0].message


async def test_roster_settings_reach_the_server(llm_server: FakeOpenAIServer) -> None:
    roster = Roster(
        [
            AgentProfile(
                "skeptic",
                model="model-a",
                temperature=0.1,
                max_tokens=64,
                system_prompt='You are {name}, the skeptic. Answer as {"vote": "..."}.',
                display_name="Skeptic",
            ),
            AgentProfile("optimist", timeout_s=10),
        ]
    )
    orch = orchestrator(llm_server, roster=roster, temperature=0.9)
    context = ContextBundle("t", "Is it good?")
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(roster.requests(context))
        stranger = await service.invoke_concurrent(make_requests(1, context))
    assert result.success_count == 2
    by_agent = {
        h["x-conclave-agent"]: b for h, b in zip(llm_server.headers, llm_server.bodies, strict=True)
    }
    skeptic, optimist = by_agent["skeptic"], by_agent["optimist"]
    assert skeptic["model"] == "model-a" and skeptic["temperature"] == 0.1
    assert skeptic["max_tokens"] == 64
    assert skeptic["messages"][0]["content"] == (
        'You are Skeptic, the skeptic. Answer as {"vote": "..."}.'
    )
    assert optimist["model"] == "fake-model" and optimist["temperature"] == 0.9
    assert "max_tokens" not in optimist
    (failure,) = stranger.failures
    assert failure.error_type == "AgentNotFoundError"


async def test_api_key_is_sent_but_never_shown(
    llm_server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-test-SECRET-0123456789"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    orch = orchestrator(llm_server)
    assert secret not in repr(orch)
    llm_server.script("archon-1", 500)
    llm_server.script("archon-2", 401)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        assert secret not in repr(bridge)
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(2))
    assert llm_server.headers[0]["authorization"] == f"Bearer {secret}"
    assert secret not in result.failures[0].message
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "retrying chat completion" in logged
    assert secret not in logged
    assert "Is it good" not in logged and "votes aye" not in logged


# ------------------------------------------------------------------ the bridge itself


class AsyncioEcho:
    """A minimal asyncio-native orchestrator."""

    def __init__(self) -> None:
        self.closed = False
        self.cancelled: list[str] = []
        self.delay = 0.0

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        asyncio.get_running_loop()  # really asyncio
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled.append(agent_id)
            raise
        if agent_id == "raise":
            raise LookupError("no such motion")
        from uuid import uuid4

        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="ok")

    async def aclose(self) -> None:
        self.closed = True


async def test_bridge_passes_exceptions_unchanged_and_closes_inner() -> None:
    inner = AsyncioEcho()
    async with AsyncioOrchestratorBridge(inner) as bridge:
        out = await bridge.invoke("a", ContextBundle("t", "c"))
        assert out.agent_id == "a"
        with pytest.raises(LookupError, match="no such motion"):
            await bridge.invoke("raise", ContextBundle("t", "c"))
    assert inner.closed
    with pytest.raises(RuntimeError, match="async with"):
        await bridge.invoke("a", ContextBundle("t", "c"))


async def test_bridge_reuses_a_running_loop() -> None:
    async with trio_asyncio.open_loop() as loop, AsyncioOrchestratorBridge(AsyncioEcho()) as bridge:
        assert bridge._loop is loop
        await bridge.invoke("a", ContextBundle("t", "c"))
    # and opens its own when none runs
    async with AsyncioOrchestratorBridge(AsyncioEcho()) as bridge:
        assert bridge._loop is not None


async def test_trio_cancellation_cancels_the_asyncio_task() -> None:
    inner = AsyncioEcho()
    inner.delay = 3600
    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge, agent_timeout=0.05)
        result = await service.invoke_concurrent(make_requests(5))
    assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}
    assert sorted(inner.cancelled) == sorted(f"archon-{i}" for i in range(1, 6))


def test_bridge_and_orchestrator_reject_bad_arguments() -> None:
    class SyncInvoke:
        def invoke(self, agent_id: str, context: ContextBundle) -> None: ...

    with pytest.raises(InvalidRequestError):
        AsyncioOrchestratorBridge(SyncInvoke())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match="base_url"):
        OpenAIChatOrchestrator("localhost:8080", "m")
    with pytest.raises(InvalidRequestError, match=r"base_url.*has no host"):
        OpenAIChatOrchestrator("http://", "m")
    with pytest.raises(InvalidRequestError, match=r"base_url.*credentials") as info:
        OpenAIChatOrchestrator("https://me:s3cret@api.example.com/v1", "m")
    assert "s3cret" not in str(info.value)
    with pytest.raises(InvalidRequestError, match="model"):
        OpenAIChatOrchestrator("http://x/v1", "")
    with pytest.raises(InvalidRequestError, match="temperature"):
        OpenAIChatOrchestrator("http://x/v1", "m", temperature=5)
    with pytest.raises(InvalidRequestError, match="timeout_s"):
        OpenAIChatOrchestrator("http://x/v1", "m", timeout_s=0)
    with pytest.raises(InvalidRequestError, match="max_retries"):
        OpenAIChatOrchestrator("http://x/v1", "m", max_retries=-1)
    with pytest.raises(AgentNotFoundError):
        Roster.default(2).get("archon-3")


@pytest.mark.parametrize("how", ["agent_timeout", "outer_cancel"])
async def test_timeouts_and_outer_cancels_close_the_http_requests(
    llm_server: FakeOpenAIServer, how: str
) -> None:
    llm_server.default = "hang"
    pool = AgentPool()
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, timeout_s=600)) as bridge:
        if how == "agent_timeout":
            service = ConcurrentDeliberationService(bridge, pool=pool, agent_timeout=0.3)
            result = await service.invoke_concurrent(make_requests(10))
            assert {f.kind for f in result.failures} == {FailureKind.TIMEOUT}
        else:
            service = ConcurrentDeliberationService(bridge, pool=pool)
            with trio.CancelScope() as scope:

                async def cancel_when_all_in_flight() -> None:
                    await wait_server(llm_server, lambda s: s.in_flight == 10)
                    scope.cancel()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(cancel_when_all_in_flight)
                    await service.invoke_concurrent(make_requests(10))
            assert scope.cancelled_caught
    assert pool.active_count == 0
    await wait_server(llm_server, lambda s: s.disconnects == 10)


# ------------------------------------------------------------------ agent ids in the header

UNICODE_IDS = ("ārchon-Ω", "议员-7", "Ñandú 2", "🦉", "a%41b", "x/y?z&w=1", " padded ")


async def every_agent_answers(llm_server: FakeOpenAIServer, roster: Roster) -> ConcurrentResult:
    """Deliberate with every agent of ``roster`` through the bridge: each must succeed,
    answered in its own name (the server decoded the header back to the original id)."""
    async with AsyncioOrchestratorBridge(orchestrator(llm_server, roster=roster)) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            roster.requests(ContextBundle("t", "Is it good?"))
        )
    assert result.success_count == len(roster), result.failures
    for output in result.outputs:
        assert output.content.startswith(f"{output.agent_id} votes aye")
    return result


async def test_non_ascii_agent_ids_work_end_to_end(llm_server: FakeOpenAIServer) -> None:
    result = await every_agent_answers(
        llm_server, Roster([AgentProfile(agent_id) for agent_id in UNICODE_IDS])
    )
    for output in result.outputs:  # each id was counted as itself, once
        assert llm_server.attempts[output.agent_id] == 1
    raw = {h["x-conclave-agent"] for h in llm_server.headers}
    assert "%C4%81rchon-%CE%A9" in raw  # UTF-8, percent-encoded (RFC 3986)
    assert "a%2541b" in raw  # a literal % is encoded too, so decoding is exact
    assert all(value.isascii() for value in raw)


async def test_plain_ids_travel_unchanged(llm_server: FakeOpenAIServer) -> None:
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(2))
    assert sorted(h["x-conclave-agent"] for h in llm_server.headers) == ["archon-1", "archon-2"]


# Mostly printable ids (every Unicode category a roster accepts), sometimes anything at all.
PRINTABLE_ID = st.text(
    st.characters(exclude_categories=("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"))
    | st.just(" "),
    min_size=1,
    max_size=12,
)
ANY_ID = PRINTABLE_ID | PRINTABLE_ID | PRINTABLE_ID | st.text(min_size=1, max_size=12)


# The server fixture is shared by the examples on purpose: nothing below reads its counters.
@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(agent_ids=st.lists(ANY_ID, min_size=1, max_size=6, unique=True))
async def test_any_agent_ids_are_refused_at_load_or_work_end_to_end(
    llm_server: FakeOpenAIServer, agent_ids: list[str]
) -> None:
    """Hypothesis: an id either fails to load, or a real request carries it intact."""
    try:
        roster = Roster.from_dict({"agents": [{"agent_id": a} for a in agent_ids]})
    except RosterError:
        assert any(not a.strip() or not a.isprintable() for a in agent_ids)
        event("refused at load")
        return
    event("sent end to end")
    await every_agent_answers(llm_server, roster)


async def test_an_unencodable_request_is_not_called_a_malformed_response(
    llm_server: FakeOpenAIServer,
) -> None:
    orch = orchestrator(llm_server, api_key="sk-ключ", max_retries=3)
    async with AsyncioOrchestratorBridge(orch) as bridge:
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))
    (failure,) = result.failures
    assert "cannot encode the request (UnicodeEncodeError" in failure.message
    assert "not retried" in failure.message and "malformed" not in failure.message
    assert "ключ" not in failure.message
    assert llm_server.requests_total == 0


# ------------------------------------------------------------------ cancellations nobody asked for


class SelfCancelling:
    """Asyncio agents: ``rogue-*`` end in asyncio.CancelledError on their own (the client
    raised it, or cancelled its own task) once every sleeper has started; the others
    sleep for an hour or answer at once."""

    def __init__(self, sleepers: int) -> None:
        self.sleepers = sleepers
        self.started = 0
        self.all_started: asyncio.Event | None = None
        self.cancelled: list[str] = []

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        if self.all_started is None:
            self.all_started = asyncio.Event()
        if agent_id == "rogue-raise":
            await self.all_started.wait()
            raise asyncio.CancelledError("the client gave up on its own")
        if agent_id == "rogue-self-cancel":
            await self.all_started.wait()
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)  # the task's own cancel lands here
        if agent_id.startswith("sleeper"):
            self.started += 1
            if self.started == self.sleepers:
                self.all_started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.append(agent_id)
                raise
        from uuid import uuid4

        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="ok")


def _requests(*agent_ids: str) -> list[AgentRequest]:
    context = ContextBundle("t", "c")
    return [AgentRequest(agent_id=a, context=context) for a in agent_ids]


async def test_an_asyncio_cancellation_the_kernel_did_not_ask_for_is_that_agents_error() -> None:
    inner = SelfCancelling(sleepers=0)
    inner.all_started = asyncio.Event()
    inner.all_started.set()
    agents = ["ok-1", "rogue-raise", "ok-2", "rogue-self-cancel", "ok-3"]
    pool = AgentPool()
    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), pool)
        result = await service.invoke_concurrent(_requests(*agents))
        # invoke_single too: an error, not a BaseException.
        with pytest.raises(AgentInvocationError, match="rogue-raise"):
            await service.invoke_single(_requests("rogue-raise")[0])
    assert result.total_count == 5
    assert [o.agent_id for o in result.outputs] == ["ok-1", "ok-2", "ok-3"]
    assert set(result.failed_agents) == {"rogue-raise", "rogue-self-cancel"}
    for failure in result.failures:
        assert failure.kind is FailureKind.ERROR
        assert failure.error_type == "AsyncioCancelledError"
        assert f"agent {failure.agent_id!r}" in failure.message
        assert "cancelled by something other than the kernel" in failure.message
    assert pool.active_count == 0


async def test_a_real_halt_through_the_bridge_is_still_halted_not_an_error() -> None:
    inner = SelfCancelling(sleepers=4)
    halt = HaltSwitch()
    pool = AgentPool()
    agents = ["rogue-raise", *(f"sleeper-{i}" for i in range(4))]

    def halt_after_the_rogue(done: int, total: int, agent_id: str, status: str) -> None:
        if agent_id == "rogue-raise":
            halt.halt("operator")

    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, pool)
        with pytest.raises(SystemHaltedError) as info:
            await service.invoke_concurrent(_requests(*agents), on_progress=halt_after_the_rogue)
    partial = info.value.partial
    assert partial is not None and partial.total_count == 5
    kinds = {f.agent_id: f.kind for f in partial.failures}
    assert kinds.pop("rogue-raise") is FailureKind.ERROR
    assert set(kinds.values()) == {FailureKind.HALTED} and len(kinds) == 4
    assert sorted(inner.cancelled) == sorted(agents[1:])  # trio's cancel reached asyncio
    assert pool.active_count == 0


async def test_run_asyncio_turns_an_unasked_for_cancellation_into_an_error() -> None:
    async def gives_up() -> None:
        raise asyncio.CancelledError

    async with AsyncioOrchestratorBridge(AsyncioEcho()) as bridge:
        with pytest.raises(AsyncioCancelledError, match="gives_up"):
            await bridge.run_asyncio(gives_up)
        # and a trio cancellation is still trio's
        with trio.CancelScope() as scope:
            scope.cancel()
            await bridge.run_asyncio(asyncio.sleep, 3600)
        assert scope.cancelled_caught


# ------------------------------------------------------------------ set-up before the first batch


class RecordingThread(OpenAIChatOrchestrator):
    """Records which thread did the set-up (the real prepare() still runs)."""

    prepared_in: threading.Thread | None = None

    def prepare(self) -> None:
        self.prepared_in = threading.current_thread()
        super().prepare()


async def test_entering_the_bridge_builds_every_client_off_the_loop_without_a_request(
    llm_server: FakeOpenAIServer,
) -> None:
    other = llm_server.base_url.replace("127.0.0.1", "localhost")
    roster = Roster(
        [
            AgentProfile("a"),
            AgentProfile("b", base_url=llm_server.base_url + "/"),  # the default, spelled again
            AgentProfile("c", base_url=other),
            AgentProfile("d", base_url=other),
        ]
    )
    orch = RecordingThread(llm_server.base_url, "fake-model", roster=roster, **FAST)
    assert orch._clients == {}
    async with AsyncioOrchestratorBridge(orch) as bridge:
        assert orch.prepared_in is not None
        assert orch.prepared_in is not threading.current_thread()  # a worker thread
        assert orch.base_urls() == [llm_server.base_url, other]
        built = dict(orch._clients)
        assert list(built) == [llm_server.base_url, other]
        assert llm_server.requests_total == 0  # no network call on entry
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(
            roster.requests(ContextBundle("t", "c"))
        )
        assert result.success_count == 4, result.failures
        assert orch._clients == built  # the batch built nothing
        assert all(orch._clients[url] is client for url, client in built.items())
        await bridge.run_asyncio(orch.check_reachable, 5.0)  # still works
    assert orch._clients == {}  # leaving closed them


class FailingSetUp(AsyncioEcho):
    def __init__(self) -> None:
        super().__init__()
        self.fail = True

    async def aopen(self) -> None:
        if self.fail:
            raise OSError("no certificates")


async def test_a_failing_set_up_fails_the_entry_and_leaves_nothing_open() -> None:
    inner = FailingSetUp()
    bridge = AsyncioOrchestratorBridge(inner)
    with pytest.raises(OSError, match="no certificates"):
        async with bridge:
            raise AssertionError("entered")
    assert trio_asyncio.current_loop.get() is None  # the loop it opened is closed
    with pytest.raises(RuntimeError, match="async with"):
        await bridge.invoke("a", ContextBundle("t", "c"))
    inner.fail = False
    async with bridge:  # and it can be entered again
        assert (await bridge.invoke("a", ContextBundle("t", "c"))).agent_id == "a"
    assert inner.closed


@pytest.mark.slow
def test_the_first_batch_builds_nothing_and_imports_nothing_on_the_loop() -> None:
    """Fresh interpreter, 72 agents over loopback: whatever the first request would build
    lazily (the HTTP client, the SDK's resources, anyio's backend) was built on entry.

    The loop stall this causes (~45 ms idle, ~100 ms loaded, vs ~4 ms after) is measured
    by the benchmark ("first-batch loop stall"), not asserted here: wall-clock bounds
    that tell the two apart are not robust on a loaded 2-core machine.
    """
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.support.loop_stall_probe",
            "--agents",
            "72",
            "--batches",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert len(report["clients_built_on_entry"]) == 1
    assert report["clients_built_in_first_batch"] == []
    assert report["modules_imported_in_first_batch"] == []


class SlowSetUp(AsyncioEcho):
    def __init__(self) -> None:
        super().__init__()
        self.setup_cancelled = False

    async def aopen(self) -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.setup_cancelled = True
            raise


async def test_cancelling_the_entry_cancels_the_set_up_and_closes_the_loop() -> None:
    inner = SlowSetUp()
    with trio.CancelScope() as scope:

        async def cancel_when_blocked() -> None:
            await trio.testing.wait_all_tasks_blocked()
            scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(cancel_when_blocked)
            async with AsyncioOrchestratorBridge(inner):
                raise AssertionError("entered")
    assert scope.cancelled_caught
    assert inner.setup_cancelled and not inner.closed
    assert trio_asyncio.current_loop.get() is None


class CancelledJustAsTrioCancels:
    """Stands in for the trio-asyncio loop at the one instant a real one cannot be made to
    hit on purpose: the asyncio task has ended cancelled and trio-asyncio has handed that
    back (it could not know trio would cancel), and trio's cancel is already pending."""

    def __init__(self, scope: trio.CancelScope) -> None:
        self.scope = scope

    async def run_aio_coroutine(self, coro: Any) -> None:
        coro.close()
        self.scope.cancel()
        raise asyncio.CancelledError


async def test_a_trio_cancel_that_lands_just_after_the_asyncio_cancel_is_still_trios() -> None:
    async def never_run() -> None:
        raise AssertionError("not run")

    with trio.CancelScope() as scope:
        await _run(CancelledJustAsTrioCancels(scope), never_run(), "agent 'x'")
        raise AssertionError("not cancelled")
    assert scope.cancelled_caught


@pytest.mark.parametrize("seed", [[1], "7", 1.5, True])
def test_a_seed_that_is_not_an_int_is_refused(seed: object) -> None:
    with pytest.raises(InvalidRequestError, match="seed"):
        OpenAIChatOrchestrator("http://127.0.0.1:1/v1", "m", seed=seed)  # type: ignore[arg-type]


# ----------------------------------------------- a cancelled asyncio task unwinds, but not forever


class SlowToUnwind:
    """An asyncio orchestrator whose clean-up, once cancelled, takes ``cleanup_s``."""

    def __init__(self, cleanup_s: float) -> None:
        self.cleanup_s = cleanup_s
        self.unwound = 0

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            await asyncio.sleep(self.cleanup_s)  # e.g. flushing a session, politely
            self.unwound += 1
            raise
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="never")


async def test_a_halt_waits_for_slow_clean_up_no_longer_than_the_grace() -> None:
    inner = SlowToUnwind(cleanup_s=3.0)
    switch = HaltSwitch()
    async with AsyncioOrchestratorBridge(inner, unwind_grace_s=0.2) as bridge:
        service = ConcurrentDeliberationService(bridge, switch)
        timing: dict[str, float] = {}

        async def trigger() -> None:
            await trio.sleep(0.1)
            timing["halt"] = time.perf_counter()
            switch.halt("stop")

        exc = await expect_halt(lambda: service.invoke_concurrent(make_requests(5)), trigger)
        took = time.perf_counter() - timing["halt"]
        assert exc.partial is not None
        assert {f.kind for f in exc.partial.failures} == {FailureKind.HALTED}
        assert 0.15 < took < 2.5  # the grace (0.2 s), not the 3 s clean-up
        assert service.pool.available_count == 72


async def test_quick_clean_up_is_waited_for() -> None:
    inner = SlowToUnwind(cleanup_s=0.05)
    switch = HaltSwitch()
    async with AsyncioOrchestratorBridge(inner, unwind_grace_s=5.0) as bridge:
        service = ConcurrentDeliberationService(bridge, switch)

        async def trigger() -> None:
            await trio.sleep(0.1)
            switch.halt("stop")

        await expect_halt(lambda: service.invoke_concurrent(make_requests(3)), trigger)
        assert inner.unwound == 3  # every task had finished unwinding before the return


@pytest.mark.parametrize("bad", [-1, float("nan"), "1", True])
def test_bad_grace_is_refused(bad: object) -> None:
    with pytest.raises(InvalidRequestError, match="unwind_grace_s"):
        AsyncioOrchestratorBridge(SlowToUnwind(0.0), unwind_grace_s=bad)  # type: ignore[arg-type]


_ASYNCIO_FIRST = """
import asyncio, sys, openai, trio
from tests.support.fake_openai import FakeOpenAIServer

server = FakeOpenAIServer().start()

async def one_plain_sdk_call():
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="k", max_retries=0)
    await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    await client.close()

# An application's own asyncio call first: anyio's asyncio backend is imported now,
# before trio-asyncio is.
asyncio.run(one_plain_sdk_call())
assert "trio_asyncio" not in sys.modules and "anyio._backends._asyncio" in sys.modules

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from kernel import ConcurrentDeliberationService, AgentRequest, ContextBundle

async def council():
    inner = OpenAIChatOrchestrator(server.base_url, "m", max_retries=0)
    async with AsyncioOrchestratorBridge(inner) as bridge:
        context = ContextBundle("t", "a topic")
        requests = [AgentRequest(f"a{i}", context) for i in range(3)]
        result = await ConcurrentDeliberationService(bridge).invoke_concurrent(requests)
    print(result.success_count, [f.message for f in result.failures])

trio.run(council)
server.stop()
"""


def test_the_bridge_works_after_the_application_made_its_own_asyncio_sdk_call() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _ASYNCIO_FIRST], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "3 []", proc.stdout


# ---------------------------------------------------------------------- inside an AsyncioHost


HOSTED_APP = """
import asyncio, sys
from adapters.asyncio_host import AsyncioHost
from adapters.llm.bridge import AsyncioOrchestratorBridge
from kernel import AgentOutput, AgentRequest, ContextBundle

class Echo:
    async def invoke(self, agent_id, context):
        await asyncio.sleep(0)
        return AgentOutput(agent_id=agent_id, request_id=context.bundle_id, content="aye")

async def main():
    topic = ContextBundle("t", "x")
    async with AsyncioHost(AsyncioOrchestratorBridge(Echo())) as host:
        result = await host.invoke_concurrent([AgentRequest(f"a{i}", topic) for i in range(8)])
    print(result.success_count, "trio_asyncio" in sys.modules)

asyncio.run(main())
"""


def test_an_asyncio_application_hosting_the_bridge_never_gets_trio_asyncio() -> None:
    # Importing trio_asyncio makes asyncio.run build a trio-asyncio loop, inside which
    # no host can start: an application's own asyncio.run must stay plain.
    out = subprocess.run(
        [sys.executable, "-c", HOSTED_APP], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["8", "False"]


class OnTheHostLoop:
    """An asyncio orchestrator that notes which loop it runs on and how it ends."""

    def __init__(self) -> None:
        self.loops: set[asyncio.AbstractEventLoop] = set()
        self.cancelled = 0
        self.started: asyncio.Event | None = None
        self.self_cancel = False

    async def aopen(self) -> None:
        self.loops.add(asyncio.get_running_loop())
        self.started = asyncio.Event()

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        self.loops.add(asyncio.get_running_loop())
        assert self.started is not None
        self.started.set()
        if self.self_cancel:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()  # the client cancels itself: nobody asked
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        raise AssertionError("not reached")


def _on_plain_loop(main: Any) -> Any:
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(main())


def test_inside_a_host_the_inner_orchestrator_runs_on_the_host_loop_and_a_halt_cancels_it() -> None:
    from adapters.asyncio_host import AsyncioHost

    inner = OnTheHostLoop()

    async def main() -> asyncio.AbstractEventLoop:
        async with AsyncioHost(AsyncioOrchestratorBridge(inner)) as host:
            deliberation = host.start(make_requests(1))
            assert inner.started is not None
            await inner.started.wait()
            await host.ahalt("stop")
            with pytest.raises(SystemHaltedError):
                await deliberation.result()
            assert inner.cancelled == 1  # the asyncio task was cancelled, and unwound
        return asyncio.get_running_loop()

    loop = _on_plain_loop(main)
    assert inner.loops == {loop}


def test_inside_a_host_an_asyncio_cancellation_nobody_asked_for_is_that_agents_error() -> None:
    from adapters.asyncio_host import AsyncioHost

    inner = OnTheHostLoop()
    inner.self_cancel = True

    async def main() -> None:
        async with AsyncioHost(AsyncioOrchestratorBridge(inner)) as host:
            result = await host.invoke_concurrent(make_requests(2))
        assert [f.kind for f in result.failures] == [FailureKind.ERROR] * 2
        assert {f.error_type for f in result.failures} == {"AsyncioCancelledError"}

    _on_plain_loop(main)


def test_inside_a_host_a_batch_starts_its_asyncio_calls_one_per_turn_of_the_loop() -> None:
    """72 calls made ready at once would each build their request in the same turn of the
    host loop, holding it for all 72 (hundreds of ms with the openai SDK)."""
    from adapters.asyncio_host import AsyncioHost

    turns = 0
    seen: list[int] = []

    class NotesTheTurn:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            seen.append(turns)  # the first step: where the SDK builds its request
            await asyncio.sleep(0)
            return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="aye")

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    async def main() -> None:
        counting = asyncio.create_task(count_turns())
        async with AsyncioHost(AsyncioOrchestratorBridge(NotesTheTurn())) as host:
            result = await host.invoke_concurrent(make_requests(72))
        counting.cancel()
        assert result.success_count == 72

    _on_plain_loop(main)
    assert len(seen) == 72
    assert len(set(seen)) == 72, f"72 starts in {len(set(seen))} turns of the loop"


def test_inside_a_host_a_halt_before_their_turn_means_calls_never_start() -> None:
    from adapters.asyncio_host import AsyncioHost

    started: list[str] = []

    class Slow:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            started.append(agent_id)
            if len(started) == 3:
                host.halt("stop")  # from inside the third call's first step
            # A real call's first step writes to a socket, which lets other threads run:
            # the guest run's I/O thread, which carries the halt.  A step that never let
            # go of the GIL would start all 72 within one of Python's thread switches.
            time.sleep(0.001)  # noqa: ASYNC251 -- the blocking step is the point
            await asyncio.sleep(60)
            raise AssertionError("not reached")

    host = AsyncioHost(AsyncioOrchestratorBridge(Slow()))

    async def main() -> None:
        async with host:
            with pytest.raises(SystemHaltedError) as caught:
                await host.invoke_concurrent(make_requests(72))
        assert caught.value.partial is not None
        assert caught.value.partial.failure_count == 72

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        _on_plain_loop(main)
        gc.collect()  # a coroutine dropped without being closed warns when collected
    assert not [w for w in warned if "never awaited" in str(w.message)]
    assert 3 <= len(started) < 72
