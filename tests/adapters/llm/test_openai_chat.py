"""The OpenAI orchestrator's requests and what it takes from an answer: a topic's message
is built once and shared; an answer too long or too deeply nested is that agent's clear
failure, never the caller's crash.

Through the real SDK and the trio-asyncio bridge against the loopback server in
tests/support/fake_openai.py; nothing here patches the client.
"""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from typing import Any

import pytest
import trio
import trio.testing

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import (
    DEFAULT_MAX_CONTENT_CHARS,
    OpenAIChatOrchestrator,
)
from kernel import (
    MAX_TOPIC_BYTES,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    InvalidRequestError,
)
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import client_bytes, make_requests
from tests.support.hostile_parts import HUGE


def orchestrator(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIChatOrchestrator:
    settings: dict[str, Any] = {"timeout_s": 30.0, "max_retries": 0, **kwargs}
    return OpenAIChatOrchestrator(server.base_url, "fake-model", **settings)


async def wait_server(server: FakeOpenAIServer, predicate: Any) -> None:
    ok = await trio.to_thread.run_sync(server.wait_for, predicate, 20.0)
    assert ok, "server never reached the expected state"


def user_message(body: dict[str, Any]) -> str:
    return str(next(m["content"] for m in body["messages"] if m["role"] == "user"))


async def test_agents_on_one_topic_hold_one_copy_of_it_not_one_each(
    llm_server: FakeOpenAIServer,
) -> None:
    # Every in-flight request holds its encoded body (the SDK encodes each request); the
    # user message built from the topic is built once per topic and shared.
    n = 8
    llm_server.default = "hang"
    context = ContextBundle("big", "a" * MAX_TOPIC_BYTES)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        gc.collect()
        tracemalloc.start()
        try:
            before = client_bytes()
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(bridge.invoke, f"archon-{i}", context)
                await wait_server(llm_server, lambda s: s.requests_total >= n)
                held = client_bytes() - before
                nursery.cancel_scope.cancel()
        finally:
            tracemalloc.stop()
    per_agent = held / n / MAX_TOPIC_BYTES
    # One encoded body each (1x), and the shared message (1/n each); was 2x.
    assert per_agent < 1.5, f"{per_agent:.2f} x the topic per agent"


async def test_concurrent_topics_each_reach_their_own_agents(llm_server: FakeOpenAIServer) -> None:
    topics = [ContextBundle(f"t{k}", f"topic number {k}", {"k": str(k)}) for k in range(3)]
    async with (
        AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge,
        trio.open_nursery() as nursery,
    ):
        for k, context in enumerate(topics):
            for i in range(4):
                nursery.start_soon(bridge.invoke, f"agent-{k}-{i}", context)
    assert len(llm_server.bodies) == 12
    for body, headers in zip(llm_server.bodies, llm_server.headers, strict=True):
        n = headers["x-conclave-agent"].split("-")[1]
        assert user_message(body) == f"Topic t{n}:\n\ntopic number {n}\n\nContext:\n- k: {n}"


async def test_the_orchestrator_keeps_no_topic_alive_after_its_agents(
    llm_server: FakeOpenAIServer,
) -> None:
    context = ContextBundle("t", "a topic to forget")
    gone = weakref.ref(context)
    async with AsyncioOrchestratorBridge(orchestrator(llm_server)) as bridge:
        await bridge.invoke("archon-1", context)
        del context
        gc.collect()
        assert gone() is None


async def run_one(server: FakeOpenAIServer, **settings: object) -> ConcurrentResult:
    orchestrator = OpenAIChatOrchestrator(server.base_url, "fake-model", timeout_s=5, **settings)  # type: ignore[arg-type]
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        return await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(1))


async def test_a_deeply_nested_json_answer_is_a_malformed_response_naming_the_agent(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("deep_json", 200_000)
    result = await run_one(llm_server)
    (failure,) = result.failures
    assert failure.message == (
        f"agent 'archon-1' (fake-model at {llm_server.base_url}): malformed response "
        "(JSON nested too deeply)"
    )
    assert failure.error_type == "AgentInvocationError"
    assert llm_server.attempts["archon-1"] == 1  # not retried


async def test_an_answer_over_the_content_cap_is_refused_and_the_cap_can_be_raised(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("reply", "a" * 101)
    (failure,) = (await run_one(llm_server, max_content_chars=100)).failures
    assert failure.message.endswith("answer over the 100-character cap (max_content_chars)"), (
        failure.message
    )
    assert failure.message.startswith("agent 'archon-1' ")
    result = await run_one(llm_server, max_content_chars=101)
    assert result.outputs[0].content == "a" * 101


async def test_the_default_caps_take_a_long_answer_and_a_raised_byte_cap_takes_more(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = ("reply", "a" * DEFAULT_MAX_CONTENT_CHARS)
    assert (await run_one(llm_server)).success_count == 1
    llm_server.default = ("reply", "a" * (9 * 2**20))  # a body over the default 8 MiB
    refused = await run_one(llm_server, max_content_chars=10 * 2**20)
    assert "(max_response_bytes); not retried" in refused.failures[0].message
    taken = await run_one(llm_server, max_content_chars=10 * 2**20, max_response_bytes=16 * 2**20)
    assert len(taken.outputs[0].content) == 9 * 2**20


@pytest.mark.parametrize("name", ["max_response_bytes", "max_content_chars"])
@pytest.mark.parametrize("value", [0, -1, 1.5, "8", True])
def test_a_cap_that_is_not_a_positive_int_is_refused(name: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=name):
        OpenAIChatOrchestrator("http://127.0.0.1:1/v1", "m", **{name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "setting", ["timeout_s", "backoff_base_s", "backoff_cap_s", "retry_after_cap_s"]
)
def test_an_orchestrator_setting_too_large_for_a_float_is_invalid(setting: str) -> None:
    """Guards against: ``OverflowError`` out of the constructor."""
    settings: dict[str, Any] = {setting: HUGE}
    with pytest.raises(InvalidRequestError, match=setting):
        OpenAIChatOrchestrator("http://127.0.0.1:9/v1", "m", **settings)


async def test_an_answer_holding_a_lone_surrogate_is_that_agents_failure(
    llm_server: FakeOpenAIServer,
) -> None:
    """Guards against: released as an output whose ``content_hash`` raised ``UnicodeEncodeError``
    (JSON can carry ``"\\ud800"``; the SDK does not refuse it)."""
    llm_server.default = ("content", "bad \ud800 answer")
    inner = OpenAIChatOrchestrator(llm_server.base_url, "m", timeout_s=5.0)
    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(make_requests(2))
    assert result.success_count == 0
    assert {f.kind for f in result.failures} == {FailureKind.ERROR}
    assert all("Unicode" in f.message for f in result.failures)
