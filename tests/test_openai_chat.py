"""What :class:`~adapters.openai_chat.OpenAIChatOrchestrator` takes from an answer: one
that is too long or too deeply nested is that agent's clear failure, never the caller's
crash.  Against the loopback server, through the real SDK and the bridge.
"""

from __future__ import annotations

import pytest

from adapters.asyncio_bridge import AsyncioOrchestratorBridge
from adapters.openai_chat import DEFAULT_MAX_CONTENT_CHARS, OpenAIChatOrchestrator
from kernel import ConcurrentDeliberationService, ConcurrentResult, InvalidRequestError
from tests.fake_openai import FakeOpenAIServer
from tests.helpers import make_requests


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
