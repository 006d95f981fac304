from __future__ import annotations

import pytest

from adapters.stub import AgentOrchestratorStub
from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch


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
