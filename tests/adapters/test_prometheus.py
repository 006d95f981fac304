"""The Prometheus endpoint, scraped over HTTP: after batches with failures, 429s from a real
endpoint, a halt, hedges, rate-limit waits and a shared capacity."""

from __future__ import annotations

import itertools
import math
import re
import urllib.request
from uuid import uuid4

import pytest
import trio
import trio.testing
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.prometheus import export_service_metrics, serve_metrics
from adapters.stub import AgentOrchestratorStub
from kernel import (
    AgentInvocationError,
    AgentOutput,
    AgentPool,
    AgentPoolExhaustedError,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    RateLimit,
    SystemHaltedError,
)
from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import halt_after
from tests.support.model_capacity import ModelCapacity

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Endpoint:
    """A service's registry served on a free loopback port, scraped over real HTTP."""

    def __init__(self, service: ConcurrentDeliberationService) -> None:
        self.registry = CollectorRegistry()
        export_service_metrics(service, self.registry)
        self.server, _thread = serve_metrics(0, registry=self.registry)

    async def scrape(self) -> Samples:
        return await trio.to_thread.run_sync(_scrape, self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _value(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_endpoint_shows_the_right_values_after_a_batch_with_failures() -> None:
    registry = CollectorRegistry()
    stub = AgentOrchestratorStub(latency_ms=2, fail_agents={"archon-1", "archon-2", "archon-3"})
    service = ConcurrentDeliberationService(stub)
    export_service_metrics(service, registry)
    server, _thread = serve_metrics(0, registry=registry)
    try:
        await service.invoke_concurrent(make_requests(10))
        with pytest.raises(AgentPoolExhaustedError):
            await service.invoke_concurrent(make_requests(80))
        m = await trio.to_thread.run_sync(_scrape, server.server_port)
    finally:
        server.shutdown()
        server.server_close()
    assert m[("conclave_batches_total", ())] == 1
    assert m[("conclave_agent_invocations_total", ())] == 10
    assert m[("conclave_agent_failures_total", (("kind", "error"),))] == 3
    assert m[("conclave_agent_failures_total", (("kind", "timeout"),))] == 0
    assert m[("conclave_pool_exhaustion_errors_total", ())] == 1
    assert m[("conclave_halted_batches_total", ())] == 0
    assert m[("conclave_pool_active_agents", ())] == 0
    assert m[("conclave_pool_available_slots", ())] == 72
    assert m[("conclave_pool_capacity", ())] == 72
    assert m[("conclave_batch_duration_seconds_count", ())] == 1
    assert 0.002 <= m[("conclave_batch_duration_seconds_sum", ())] < 5
    assert m[("conclave_batch_duration_seconds_bucket", (("le", "+Inf"),))] == 1


async def test_gauges_are_read_at_scrape_time(autojump_clock: trio.testing.MockClock) -> None:
    registry = CollectorRegistry()
    service = ConcurrentDeliberationService(AgentOrchestratorStub(latency_ms=1000))
    collector = export_service_metrics(service, registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, make_requests(30))
        await trio.sleep(0.5)
        active = {m.name: m.samples[0].value for m in collector.collect()}
        assert active["conclave_pool_active_agents"] == 30
        assert active["conclave_pool_available_slots"] == 42


def test_bad_arguments() -> None:
    with pytest.raises(InvalidRequestError):
        export_service_metrics(object(), CollectorRegistry())  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError):
        serve_metrics(70000)


async def test_agent_durations_and_failures_per_batch_are_scraped() -> None:
    plan = {"archon-1": Step(0.0, "error"), "archon-2": Step(0.0, "error")}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan, Step(0.01)))
    endpoint = Endpoint(service)
    try:
        await service.invoke_concurrent(make_requests(6))
        await service.invoke_concurrent(make_requests(3, prefix="other"))
        m = await endpoint.scrape()
    finally:
        endpoint.close()
    assert _value(m, "conclave_agent_duration_seconds_count", outcome="ok") == 7
    assert _value(m, "conclave_agent_duration_seconds_count", outcome="error") == 2
    assert _value(m, "conclave_batch_failures_count") == 2
    assert _value(m, "conclave_batch_failures_sum") == 2
    assert _value(m, "conclave_batch_failures_bucket", le="0.0") == 1  # the clean batch
    assert _value(m, "conclave_batch_failures_bucket", le="1.0") == 1
    assert _value(m, "conclave_batch_failures_bucket", le="2.0") == 2
    assert _value(m, "conclave_halted") == 0


async def test_llm_requests_by_status_and_tokens_come_from_the_adapters_metadata(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.script("archon-1", ("429", 0))  # then the default: an answer
    llm_server.script("archon-2", 401)
    orchestrator = OpenAIChatOrchestrator(
        llm_server.base_url, "fake-model", max_retries=2, backoff_base_s=0.001, seed=1
    )
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge)
        endpoint = Endpoint(service)
        try:
            result = await service.invoke_concurrent(make_requests(4))
            m = await endpoint.scrape()
        finally:
            endpoint.close()
    assert result.failed_agents == ("archon-2",)
    requests = {
        labels: value
        for (name, labels), value in m.items()
        if name == "conclave_llm_requests_total"
    }
    assert requests == {
        (("model", "fake-model"), ("status", "200")): 3,
        (("model", "fake-model"), ("status", "401")): 1,
        (("model", "fake-model"), ("status", "429")): 1,
    }
    for direction, key in (("prompt", "prompt_tokens"), ("completion", "completion_tokens")):
        expected = sum(int(o.metadata[key]) for o in result.outputs)
        assert expected > 0
        scraped = _value(m, "conclave_llm_tokens_total", model="fake-model", direction=direction)
        assert scraped == expected


async def test_the_halted_gauge_follows_the_halt_and_halt_to_stop_is_observed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    switch = HaltSwitch()
    service = ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(5.0)), switch)
    registry = CollectorRegistry()
    export_service_metrics(service, registry)

    def value(name: str, labels: dict[str, str] | None = None) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("conclave_halted") == 0
    await expect_halt(
        lambda: service.invoke_concurrent(make_requests(5)), lambda: halt_after(switch, 1.0)
    )
    assert value("conclave_halted") == 1
    assert value("conclave_halt_stop_seconds_count") == 1
    assert value("conclave_halt_stop_seconds_bucket", {"le": "0.001"}) == 1  # at once
    assert value("conclave_agent_duration_seconds_count", {"outcome": "halted"}) == 5
    switch.clear(approvers=("alice", "bob"), reason="all clear")
    assert value("conclave_halted") == 0


async def test_the_halted_gauge_without_a_probe_is_what_the_last_batch_saw(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class NoProbe:  # a channel that can only be read (as a file or remote channel is)
        def __init__(self) -> None:
            self.reason: str | None = None

        async def is_halted(self) -> bool:
            return self.reason is not None

        async def get_halt_reason(self) -> str | None:
            return self.reason

    channel = NoProbe()
    service = ConcurrentDeliberationService(ScriptedOrchestrator(), channel)
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    channel.reason = "stop"
    with pytest.raises(Exception, match="halted"):
        await service.invoke_concurrent(make_requests(1))
    assert registry.get_sample_value("conclave_halted") == 1
    channel.reason = None
    await service.invoke_concurrent(make_requests(1))
    assert registry.get_sample_value("conclave_halted") == 0


async def test_a_hedged_agents_call_is_counted_once_from_the_call_that_answered(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.script("archon-1", "hang")  # its first call never answers; the hedge does
    orchestrator = OpenAIChatOrchestrator(llm_server.base_url, "fake-model", max_retries=0)
    async with AsyncioOrchestratorBridge(orchestrator) as bridge:
        service = ConcurrentDeliberationService(bridge)
        endpoint = Endpoint(service)
        try:
            result = await service.invoke_concurrent(
                make_requests(2), hedge=HedgePolicy(delay=0.3, budget=0.5)
            )
            m = await endpoint.scrape()
        finally:
            endpoint.close()
    assert result.success_count == 2 and "archon-1" in result.hedged_agents
    assert _value(m, "conclave_hedges_launched_total") >= 1
    assert _value(m, "conclave_hedges_won_total") >= 1
    assert _value(m, "conclave_llm_requests_total", model="fake-model", status="200") == 2
    assert _value(m, "conclave_agent_duration_seconds_count", outcome="ok") == 2


async def test_rate_limit_waits_are_counted_in_seconds(
    autojump_clock: trio.testing.MockClock,
) -> None:
    service = ConcurrentDeliberationService(
        ScriptedOrchestrator(), rate_limit=RateLimit(per_second=4, burst=1)
    )
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    await service.invoke_concurrent(make_requests(4))
    waited = registry.get_sample_value("conclave_rate_limit_wait_seconds_total")
    assert waited == pytest.approx(0.25 + 0.5 + 0.75)


async def test_shared_capacity_gauges_appear_only_with_a_shared_capacity(
    autojump_clock: trio.testing.MockClock,
) -> None:
    shared = ModelCapacity(10)
    service = ConcurrentDeliberationService(
        ScriptedOrchestrator(default=Step(1.0)), pool=AgentPool(8, shared=shared)
    )
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    assert registry.get_sample_value("conclave_shared_capacity_limit") == 10
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.invoke_concurrent, make_requests(6))
        await trio.sleep(0.5)
        assert registry.get_sample_value("conclave_shared_capacity_in_flight") == 6
    assert registry.get_sample_value("conclave_shared_capacity_in_flight") == 0
    plain = CollectorRegistry()
    export_service_metrics(ConcurrentDeliberationService(ScriptedOrchestrator()), plain)
    assert plain.get_sample_value("conclave_shared_capacity_limit") is None
    assert plain.get_sample_value("conclave_shared_capacity_in_flight") is None


def test_a_bad_namespace_or_a_name_clash_registers_nothing() -> None:
    registry = CollectorRegistry()
    service = ConcurrentDeliberationService(ScriptedOrchestrator())
    for bad in ("con-clave", "", "9lives", "name space"):
        with pytest.raises(InvalidRequestError, match="namespace"):
            export_service_metrics(service, registry, namespace=bad)
    assert list(registry.collect()) == []
    export_service_metrics(service, registry)
    before = sorted(f.name for f in registry.collect())
    with pytest.raises(InvalidRequestError, match="registry"):
        export_service_metrics(ConcurrentDeliberationService(ScriptedOrchestrator()), registry)
    assert sorted(f.name for f in registry.collect()) == before


class ReportsWaits:
    """Answers, or fails, as an LLM adapter does after waiting on its provider's budget."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.lowlevel.checkpoint()
        metadata: dict[str, str | int | float] = {
            "model": "m",
            "rate_limited_ms": 250.0,
            "http_statuses": "429 200",
        }
        if agent_id == "archon-1":
            raise AgentInvocationError("gave up", metadata={**metadata, "http_statuses": "429"})
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata)


async def test_provider_budget_waits_the_adapters_report_are_counted_too() -> None:
    service = ConcurrentDeliberationService(ReportsWaits())
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    await service.invoke_concurrent(make_requests(3))
    assert registry.get_sample_value("conclave_rate_limit_wait_seconds_total") == 0.75
    requests = {"model": "m", "status": "429"}
    assert registry.get_sample_value("conclave_llm_requests_total", requests) == 3


async def test_every_series_the_shipped_alert_rules_read_is_exported() -> None:
    rules = (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()
    wanted = set(re.findall(r"\bconclave_[a-z_]+", rules))
    assert wanted  # the rules read the exporter's names, not recording rules alone
    service = ConcurrentDeliberationService(ReportsWaits(), HaltSwitch())
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    await service.invoke_concurrent(make_requests(3))
    exported = {s.name for family in registry.collect() for s in family.samples}
    assert wanted <= exported, sorted(wanted - exported)


async def test_agents_a_quorum_cancelled_are_not_failures_per_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 3 of 10 answer at once, 7 are slow: a quorum of 3 cancels 7 agents that did nothing
    # wrong.  The "more than 5 failed agents" alert must not fire for what the caller asked.
    plan = {f"archon-{i}": Step(0.0) for i in range(1, 4)}
    service = ConcurrentDeliberationService(ScriptedOrchestrator(plan, Step(10.0)))
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    result = await service.invoke_concurrent(make_requests(10), quorum=3)
    assert result.failure_count == 7
    assert registry.get_sample_value("conclave_batch_failures_sum") == 0
    assert registry.get_sample_value("conclave_batch_failures_bucket", {"le": "0.0"}) == 1


async def test_agents_a_halt_stopped_are_not_failures_per_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The halt has its alert (ConclaveHalted); a halted 72-agent batch is not also 72
    # failed agents.  Those that failed on their own still count.
    switch = HaltSwitch()
    plan = {"archon-1": Step(0.0, "error")}
    service = ConcurrentDeliberationService(
        ScriptedOrchestrator(plan, Step(10.0)), halt_checker=switch
    )
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(halt_after, switch, 1.0)
        with pytest.raises(SystemHaltedError):
            await service.invoke_concurrent(make_requests(8))
    assert registry.get_sample_value("conclave_batch_failures_sum") == 1


async def test_ten_thousand_model_names_from_a_server_make_a_bounded_number_of_series() -> None:
    # The model label comes from the server's answer: a hostile or buggy server naming a
    # new model in every answer must not grow the registry without bound.
    names = itertools.count()

    class NewModelEachCall:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            await trio.lowlevel.checkpoint()
            metadata = {
                "model": f'm-{next(names)}"\n\x00',
                "http_statuses": "200",
                "prompt_tokens": 3,
                "completion_tokens": 2,
            }
            return AgentOutput(
                agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata
            )

    service = ConcurrentDeliberationService(NewModelEachCall())
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    for batch in range(139):  # 10,008 calls
        await service.invoke_concurrent(make_requests(72, prefix=f"b{batch}"))
    requests = [
        s for f in registry.collect() for s in f.samples if s.name == "conclave_llm_requests_total"
    ]
    assert len(requests) <= 101
    assert sum(s.value for s in requests) == 139 * 72  # every call still counted
    tokens = [
        s for f in registry.collect() for s in f.samples if s.name == "conclave_llm_tokens_total"
    ]
    assert len(tokens) <= 202
    assert sum(s.value for s in tokens) == 139 * 72 * 5


async def test_a_model_name_utf8_cannot_encode_never_breaks_a_scrape() -> None:
    # An orchestrator's metadata may hold a lone surrogate (JSON's "\ud800"); as a label
    # value it made every later scrape of the process fail to encode.
    class OddModel:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            await trio.lowlevel.checkpoint()
            metadata = {"model": "m\ud800", "http_statuses": "200", "prompt_tokens": 3}
            return AgentOutput(
                agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata
            )

    service = ConcurrentDeliberationService(OddModel())
    endpoint = Endpoint(service)
    try:
        await service.invoke_concurrent(make_requests(2))
        m = await endpoint.scrape()
    finally:
        endpoint.close()
    requests = [v for (name, _), v in m.items() if name == "conclave_llm_requests_total"]
    assert requests == [2]
    assert _value(m, "conclave_batches_total") == 1


async def test_a_token_count_beyond_belief_is_not_counted_and_the_rest_of_the_call_is() -> None:
    # 10**400 raised OverflowError in the observer (the call's other numbers lost with
    # it); 10**30 left the counter at 1e30, where adding a real count changes nothing.
    class Lies:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            await trio.lowlevel.checkpoint()
            lie = 10**400 if agent_id == "archon-1" else 10**30
            metadata = {
                "model": "m",
                "prompt_tokens": lie,
                "completion_tokens": 7,
                "rate_limited_ms": 100.0,
            }
            return AgentOutput(
                agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata
            )

    service = ConcurrentDeliberationService(Lies())
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    await service.invoke_concurrent(make_requests(2))
    tokens = "conclave_llm_tokens_total"
    assert registry.get_sample_value(tokens, {"model": "m", "direction": "prompt"}) is None
    assert registry.get_sample_value(tokens, {"model": "m", "direction": "completion"}) == 14
    assert registry.get_sample_value("conclave_rate_limit_wait_seconds_total") == 0.2


@pytest.mark.parametrize("waited_ms", [math.inf, 10**400, math.nan, -5.0])
async def test_a_rate_limit_wait_that_is_no_duration_is_not_counted(waited_ms: float) -> None:
    # inf made the counter inf for good; 10**400 raised OverflowError in the observer.
    class OddWait:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            await trio.lowlevel.checkpoint()
            metadata = {"model": "m", "rate_limited_ms": waited_ms, "completion_tokens": 3}
            if agent_id == "archon-2":
                metadata["rate_limited_ms"] = 250.0
            return AgentOutput(
                agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata
            )

    service = ConcurrentDeliberationService(OddWait())
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    await service.invoke_concurrent(make_requests(2))
    assert registry.get_sample_value("conclave_rate_limit_wait_seconds_total") == 0.25
    tokens = {"model": "m", "direction": "completion"}
    assert registry.get_sample_value("conclave_llm_tokens_total", tokens) == 6
