from __future__ import annotations

import functools
import inspect
import math
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from adapters.stub import AgentOrchestratorStub
from kernel import AgentPool, ConcurrentDeliberationService, HaltSwitch
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.valkey_server import ValkeyServer

# tests/adapters/llm/crewai/ needs crewai, which has an environment of its own (.venv-crewai: crewai
# pins openai<3, this one has openai 3).  `make test` runs this directory there, with
# CONCLAVE_CREWAI_TESTS=1; every other run leaves it out by path, and says so.
CREWAI_TESTS = os.environ.get("CONCLAVE_CREWAI_TESTS") == "1"
collect_ignore = [] if CREWAI_TESTS else ["adapters/llm/crewai"]


def pytest_report_header() -> str:
    if CREWAI_TESTS:
        return "tests/adapters/llm/crewai: included (CONCLAVE_CREWAI_TESTS=1)"
    return CREWAI_LEFT_OUT


CREWAI_LEFT_OUT = (
    "tests/adapters/llm/crewai: not collected here; `make test` runs them in .venv-crewai"
)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Said at the end too, where ``-q`` (which drops the header) still shows it."""
    if not CREWAI_TESTS:
        terminalreporter.write_line(CREWAI_LEFT_OUT)


def _fail_on_stray_cancel(test: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A ``trio.Cancelled`` that escapes a test while no cancel scope asked for it is a
    failure.  Without this, pytest-trio swallows it and the test *passes* without running
    its assertions: a kernel that leaks a stray cancellation would pass the very tests
    written to catch that."""

    @functools.wraps(test)
    async def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return await test(*args, **kwargs)
        except trio.Cancelled:
            if trio.current_effective_deadline() == -math.inf:
                raise  # a real cancellation (a crashed fixture): pytest-trio's own
            raise AssertionError("a trio.Cancelled nobody asked for escaped the test") from None

    return run


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    # tryfirst: before pytest-trio turns the coroutine function into its runner.
    if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
        item.obj = _fail_on_stray_cancel(item.obj)
    yield


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
    """One real Valkey (or Redis) server for the session, on a free 127.0.0.1 port (its
    default capacity name known unused: no recovery grace)."""
    with ValkeyServer() as server:
        server.seed_capacity()
        yield server


@pytest.fixture(scope="session", autouse=True)
def _state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The commands' state (``--hedge-after auto``'s answer times) in a directory of the
    session's, never the home of whoever runs the tests; subprocesses inherit it."""
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("state"))
    yield
    if before is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = before
