"""A batch's failures come to a few causes, each said once: a wrong model or key is one
line for 72 agents, and each failure keeps its own detail.

The LLM failures are real: the openai SDK and the bridge against the loopback server
(tests/support/fake_openai.py answers as OpenAI does to a wrong model or key).
"""

from __future__ import annotations

import uuid

import pytest

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.failures import describe_agent, failure_causes
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from kernel import (
    AgentFailure,
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    FailureKind,
    HaltSwitch,
)
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import make_requests
from tests.support.url_secrets import assert_never_shown

WRONG_KEY = "sk-proj-Zq7wrongkeyQx9"


async def run_council(
    server: FakeOpenAIServer, model: str, n: int = 72, **settings: object
) -> ConcurrentResult:
    inner = OpenAIChatOrchestrator(server.base_url, model, max_retries=0, **settings)  # type: ignore[arg-type]
    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        return await service.invoke_concurrent(make_requests(n))


async def test_a_model_the_server_does_not_have_is_one_cause_for_72_agents(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.models = ["fake-model"]
    result = await run_council(llm_server, "gpt-x")
    (cause,) = failure_causes(result.failures)
    assert cause.summary() == f"72 agents: 404 model 'gpt-x' not found at {llm_server.base_url}"
    assert (cause.model, cause.base_url, cause.kind) == (
        "gpt-x",
        llm_server.base_url,
        FailureKind.ERROR,
    )
    # Each failure keeps its agent's own detail, the server's words included.
    assert cause.agent_ids == tuple(f"archon-{i}" for i in range(1, 73))
    assert cause.failures[6].message.startswith("agent 'archon-7' (gpt-x at ")
    assert "does not exist" in cause.failures[6].message
    assert sum(llm_server.attempts.values()) == 72  # a 404 is not retried


async def test_a_wrong_key_is_one_cause_and_never_shown(llm_server: FakeOpenAIServer) -> None:
    llm_server.api_key = "sk-the-right-one"
    result = await run_council(llm_server, "fake-model", 12, api_key=WRONG_KEY)
    (cause,) = failure_causes(result.failures)
    assert cause.summary() == (
        f"12 agents: 401 authentication failed at {llm_server.base_url} (check the API key)"
    )
    # The server quotes the key's ends (as OpenAI does); nothing of it reaches a message.
    assert_never_shown(WRONG_KEY, [f.message for f in result.failures])
    assert not any(WRONG_KEY[-4:] in f.message for f in result.failures)


async def test_a_404_that_is_not_about_the_model_is_not_called_a_missing_model(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.default = 404  # a base URL without its /v1 is answered so: not the model
    result = await run_council(llm_server, "fake-model", 3)
    (cause,) = failure_causes(result.failures)
    assert "model" not in cause.summary().partition("(")[0]
    assert cause.summary() == (
        "3 agents: error: HTTP 404 (injected 404); not retried "
        f"(fake-model at {llm_server.base_url})"
    )


def failure(agent_id: str, message: str, kind: FailureKind = FailureKind.ERROR) -> AgentFailure:
    return AgentFailure(agent_id, uuid.uuid4(), kind, "AgentInvocationError", message, 1.0)


def test_causes_stay_apart_and_the_most_agents_come_first() -> None:
    url = "http://127.0.0.1:9/v1"
    failures = [
        failure("a", f"{describe_agent('a', 'm1', url)}: HTTP 500 after 4 attempt(s)"),
        failure("b", f"{describe_agent('b', 'm2', url)}: HTTP 500 after 4 attempt(s)"),
        failure("c", f"{describe_agent('c', 'm2', url)}: HTTP 500 after 4 attempt(s)"),
        failure("d", "agent exceeded its timeout of 5 s", FailureKind.TIMEOUT),
        failure("e", "agent exceeded its timeout of 5 s", FailureKind.TIMEOUT),
        failure("f", "agent exceeded its timeout of 5 s", FailureKind.TIMEOUT),
    ]
    causes = failure_causes(failures)
    assert [(c.agent_ids, c.model) for c in causes] == [
        (("d", "e", "f"), None),  # the most agents first
        (("b", "c"), "m2"),
        (("a",), "m1"),  # another model: another cause, though the words are the same
    ]
    assert causes[0].summary() == "3 agents: timeout: agent exceeded its timeout of 5 s"
    assert causes[1].summary() == f"2 agents: error: HTTP 500 after 4 attempt(s) (m2 at {url})"


@pytest.mark.parametrize("agent_id", ["it's", 'say "x"', "ārchon-Ω", "a): b at c"])
def test_any_agent_id_is_taken_out_of_its_message(agent_id: str) -> None:
    url = "https://api.example/v1"
    message = f"{describe_agent(agent_id, 'CrewAI, gpt-4o', url)}: HTTP 503 after 2 attempt(s)"
    (cause,) = failure_causes(
        [failure(agent_id, message), failure("z", message.replace(repr(agent_id), "'z'"))]
    )
    assert (cause.count, cause.model, cause.base_url) == (2, "CrewAI, gpt-4o", url)
    assert cause.cause == "HTTP 503 after 2 attempt(s)"
