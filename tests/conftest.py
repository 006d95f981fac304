from __future__ import annotations

from collections.abc import Iterator

import pytest

from adapters.stub import AgentOrchestratorStub
from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch
from tests.fake_openai import FakeOpenAIServer
from tests.valkey_server import ValkeyServer


@pytest.fixture
def halt() -> HaltSwitch:
    return HaltSwitch()


@pytest.fixture
def pool() -> AgentPool:
    return AgentPool()


@pytest.fixture
def stub() -> AgentOrchestratorStub:
    return AgentOrchestratorStub(latency_ms=10.0)


@pytest.fixture
def service(
    stub: AgentOrchestratorStub, halt: HaltSwitch, pool: AgentPool
) -> ConcurrentDeliberationService:
    return ConcurrentDeliberationService(stub, halt, pool)


@pytest.fixture(scope="session")
def _fake_openai_server() -> Iterator[FakeOpenAIServer]:
    server = FakeOpenAIServer().start()
    yield server
    server.stop()


@pytest.fixture
def llm_server(_fake_openai_server: FakeOpenAIServer) -> FakeOpenAIServer:
    """The loopback OpenAI-compatible server, with faults and counters reset."""
    _fake_openai_server.reset()
    return _fake_openai_server


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[ValkeyServer]:
    """One real Valkey (or Redis) server for the session, on a free 127.0.0.1 port."""
    with ValkeyServer() as server:
        yield server
