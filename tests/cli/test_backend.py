"""The CLI's backend set-up, called with explicit settings: what it opens it closes.

In-process (the subprocess tests in test_cli*.py cover the command around it): the
halt channels, the stub's fail set, and ``open_service``'s witness and metrics server.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing

from adapters.cli._backend import (
    OperatorInterrupt,
    UsageError,
    halt_checker,
    halt_reason_now,
    open_service,
    stub_orchestrator,
    tracing_requested,
)
from adapters.halt.file import FileHaltChannel
from adapters.stub import AgentOrchestratorStub
from adapters.witness.sqlite import SqliteWitness
from kernel import AgentOrchestratorProtocol, AgentPool, HaltSwitch
from tests.support.helpers import make_requests
from tests.support.otlp_collector import Collector

IDS = [f"archon-{i}" for i in range(1, 11)]


async def test_the_stub_fails_a_seeded_share_of_the_agents() -> None:
    async def fail_set(seed: int) -> frozenset[str]:
        async with stub_orchestrator(
            IDS, latency_ms=1, jitter_ms=0, fail_rate=0.3, seed=seed
        ) as orchestrator:
            assert isinstance(orchestrator, AgentOrchestratorStub)
            return orchestrator.fail_agents

    first = await fail_set(7)
    assert len(first) == 3 and first <= set(IDS)  # round(0.3 * 10)
    assert await fail_set(7) == first  # the same seed, the same agents


async def test_without_a_halt_file_the_switch_is_the_whole_halt(tmp_path: Path) -> None:
    switch = HaltSwitch()
    assert halt_checker(switch, None) is switch
    checker = halt_checker(switch, tmp_path / "halt.json")  # no file yet: not halted
    assert await halt_reason_now(checker) is None
    await FileHaltChannel(tmp_path / "halt.json").ahalt("from the file")
    assert await halt_reason_now(checker) == "from the file"


class _Broken:
    async def is_halted(self) -> bool:
        raise OSError("disk gone")

    async def get_halt_reason(self) -> str | None:
        return None


class _Hung:
    async def is_halted(self) -> bool:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def get_halt_reason(self) -> str | None:
        return None


async def test_an_unreadable_halt_channel_counts_as_halted() -> None:
    assert await halt_reason_now(_Broken()) == (
        "halt channel unreadable (OSError); treated as halted"
    )


async def test_a_halt_channel_that_never_answers_counts_as_halted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    assert await halt_reason_now(_Hung()) is not None


async def test_first_signal_halts_and_a_second_stops_waiting() -> None:
    interrupt = OperatorInterrupt()

    async def signal_twice() -> None:
        with trio.fail_after(10):  # a second signal that is ignored fails, not hangs
            async with trio.open_nursery() as nursery:
                await nursery.start(interrupt.watch)
                os.kill(os.getpid(), signal.SIGTERM)
                assert await interrupt.switch.wait_halted() == "operator interrupt (SIGTERM)"
                assert interrupt.signal_name == "SIGTERM"
                os.kill(os.getpid(), signal.SIGTERM)
                await trio.sleep_forever()

    with pytest.raises(BaseExceptionGroup) as info:
        await signal_twice()
    assert info.group_contains(KeyboardInterrupt)


@asynccontextmanager
async def _recorded(events: list[str]) -> AsyncIterator[AgentOrchestratorProtocol]:
    events.append("opened")
    try:
        yield AgentOrchestratorStub(latency_ms=1)
    finally:
        events.append("closed")


def _metrics_url(stderr: str) -> str:
    found = re.search(r"metrics at (http://127\.0\.0\.1:\d+/metrics)", stderr)
    assert found, stderr
    return found.group(1)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


async def test_open_service_runs_and_closes_the_witness_and_metrics_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events: list[str] = []
    db = tmp_path / "witness.db"
    async with open_service(
        _recorded(events),
        HaltSwitch(),
        AgentPool(4),
        agent_timeout=5,
        witness_db=db,
        metrics_port=0,
    ) as service:
        result = await service.invoke_concurrent(make_requests(3))
        url = _metrics_url(capsys.readouterr().err)
        assert "conclave_batches_total 1.0" in await trio.to_thread.run_sync(_get, url)
        assert events == ["opened"]
    assert result.success_count == 3
    assert events == ["opened", "closed"]
    with pytest.raises(OSError):  # the server is gone
        await trio.to_thread.run_sync(_get, url)
    async with SqliteWitness(db) as witness:
        assert (await witness.verify()).records == 3  # every output was committed


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


async def test_a_taken_metrics_port_is_a_usage_error_and_closes_the_backend(
    taken_port: int,
) -> None:
    events: list[str] = []
    with pytest.raises(UsageError, match=rf"^--metrics-port {taken_port}: "):
        async with open_service(
            _recorded(events),
            HaltSwitch(),
            AgentPool(4),
            agent_timeout=None,
            witness_db=None,
            metrics_port=taken_port,
        ):
            raise AssertionError("the service must not open")
    assert events == ["opened", "closed"]


def test_the_standard_environment_turns_tracing_on() -> None:
    assert not tracing_requested({})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"})
    assert not tracing_requested(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}
    )


async def test_an_otlp_endpoint_in_the_environment_traces_the_service(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector = Collector()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", collector.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "council-test")
    events: list[str] = []
    try:
        async with open_service(
            _recorded(events),
            HaltSwitch(),
            AgentPool(4),
            agent_timeout=None,
            witness_db=None,
            metrics_port=None,
        ) as service:
            await service.invoke_concurrent(make_requests(2))
    finally:
        collector.close()
    names = sorted(s.name for s in collector.spans())
    assert names == ["chat stub", "chat stub", "conclave.deliberation"]  # the stub says its model
    resource = collector.requests[0].resource_spans[0].resource
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == (
        "council-test"
    )
    assert events == ["opened", "closed"]


@pytest.mark.parametrize("explicit", [True, False])
async def test_a_malformed_otel_setting_is_refused_with_otel_and_a_warning_without(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], explicit: bool
) -> None:
    # Asked for with --otel, a setting the SDK refuses is bad usage (nothing runs);
    # asked for by the environment alone, the run goes on untraced, saying why.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "-1")
    events: list[str] = []

    async def run() -> None:
        async with open_service(
            _recorded(events),
            HaltSwitch(),
            AgentPool(4),
            agent_timeout=None,
            witness_db=None,
            metrics_port=None,
            tracing=explicit,
        ) as service:
            await service.invoke_concurrent(make_requests(2))
            assert not service.metrics.observers

    if explicit:
        with pytest.raises(UsageError, match="OTEL_BSP_MAX_QUEUE_SIZE"):
            await run()
    else:
        await run()
        assert "OTEL_BSP_MAX_QUEUE_SIZE" in capsys.readouterr().err
