"""Traces of a batch: spans seen by the SDK's in-memory exporter, the traceparent a loopback
OpenAI server receives, and a real OTLP/HTTP export decoded by a loopback collector."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any
from uuid import uuid4

import pytest
import trio
import trio.testing
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator, decode_agent_header
from adapters.tracing import DeliberationTracer, otlp_tracing
from kernel import (
    AgentOutput,
    ConcurrentDeliberationService,
    ContextBundle,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
    RateLimit,
)
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.hostile_parts import halt_after
from tests.support.otlp_collector import Collector

SECRET_TOPIC = "the secret topic text"


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _traced(
    orchestrator: Any, provider: TracerProvider, record_content: bool = False, **kwargs: Any
) -> ConcurrentDeliberationService:
    service = ConcurrentDeliberationService(orchestrator, **kwargs)
    service.metrics.add_observer(DeliberationTracer(provider, record_content=record_content))
    return service


def _by_kind(finished: tuple[ReadableSpan, ...]) -> tuple[ReadableSpan, list[ReadableSpan]]:
    [batch] = [s for s in finished if s.name == "conclave.deliberation"]
    return batch, [s for s in finished if s is not batch]


def _attrs(item: Any) -> dict[str, Any]:
    return dict(item.attributes or {})


def _openai(server: FakeOpenAIServer, **kwargs: Any) -> AsyncioOrchestratorBridge:
    settings: dict[str, Any] = {"max_retries": 0, **kwargs}
    return AsyncioOrchestratorBridge(
        OpenAIChatOrchestrator(server.base_url, "fake-model", **settings)
    )


@pytest.mark.slow
async def test_a_72_agent_batch_is_one_span_and_a_child_per_agent_with_genai_attributes(
    llm_server: FakeOpenAIServer, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    async with _openai(llm_server) as bridge:
        service = _traced(bridge, provider)
        context = ContextBundle("t", SECRET_TOPIC)
        result = await service.invoke_concurrent(make_requests(72, context))
    finished = exporter.get_finished_spans()
    assert len(finished) == 1 + 72
    batch, agents = _by_kind(finished)
    assert batch.attributes is not None
    assert batch.attributes["conclave.batch_id"] == str(result.batch_id)
    assert batch.attributes["conclave.success_count"] == 72
    assert batch.parent is None
    outputs = {o.agent_id: o for o in result.outputs}
    for span in agents:
        assert span.parent is not None and span.parent.span_id == batch.context.span_id
        assert span.context.trace_id == batch.context.trace_id
        a = dict(span.attributes or {})
        output = outputs[str(a["conclave.agent_id"])]
        assert span.name == "chat fake-model"
        assert a["gen_ai.operation.name"] == "chat"
        assert a["gen_ai.request.model"] == "fake-model"
        assert a["gen_ai.usage.input_tokens"] == output.metadata["prompt_tokens"]
        assert a["gen_ai.usage.output_tokens"] == output.metadata["completion_tokens"]
        assert a["gen_ai.response.finish_reasons"] == ("stop",)
        assert a["conclave.request_id"] == str(output.request_id)
        assert a["conclave.batch_id"] == str(result.batch_id)
        assert "error.type" not in a
        # Prompts and answers stay out unless asked for.
        assert not any(SECRET_TOPIC in str(v) or output.content in str(v) for v in a.values())
        assert "gen_ai.input.messages" not in a and "gen_ai.output.messages" not in a


async def test_prompts_and_answers_are_recorded_only_when_the_application_asks(
    spans: tuple[TracerProvider, InMemorySpanExporter],
) -> None:
    provider, exporter = spans
    service = _traced(ScriptedOrchestrator(), provider, record_content=True)
    result = await service.invoke_concurrent(make_requests(2, ContextBundle("t", SECRET_TOPIC)))
    _batch, agents = _by_kind(exporter.get_finished_spans())
    answers = {o.content for o in result.outputs}
    for span in agents:
        a = dict(span.attributes or {})
        assert SECRET_TOPIC in str(a["gen_ai.input.messages"])
        assert any(answer in str(a["gen_ai.output.messages"]) for answer in answers)
    with pytest.raises(InvalidRequestError):
        DeliberationTracer(provider, record_content="yes")  # type: ignore[arg-type]


async def test_the_http_request_carries_the_agent_spans_traceparent_across_the_bridge(
    llm_server: FakeOpenAIServer, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    async with _openai(llm_server) as bridge:
        await _traced(bridge, provider).invoke_concurrent(make_requests(5))
    _batch, agents = _by_kind(exporter.get_finished_spans())
    span_of = {s.attributes["conclave.agent_id"]: s for s in agents if s.attributes}
    chats = [h for h in llm_server.headers if h[":path"].endswith("/chat/completions")]
    assert len(chats) == 5
    for headers in chats:
        version, trace_id, parent_id, flags = headers["traceparent"].split("-")
        span = span_of[decode_agent_header(headers["x-conclave-agent"])]
        assert version == "00" and int(flags, 16) & 1  # sampled
        assert int(trace_id, 16) == span.context.trace_id
        assert int(parent_id, 16) == span.context.span_id


async def test_no_traceparent_is_sent_when_nothing_traces(llm_server: FakeOpenAIServer) -> None:
    async with _openai(llm_server) as bridge:
        await ConcurrentDeliberationService(bridge).invoke_concurrent(make_requests(2))
    assert all("traceparent" not in h for h in llm_server.headers)


async def test_timeouts_and_halts_are_span_events(
    autojump_clock: trio.testing.MockClock, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    plan = {"archon-1": Step(0.1), "archon-2": Step(3.0)}
    switch = HaltSwitch()
    service = _traced(ScriptedOrchestrator(plan, Step(50.0)), provider, halt_checker=switch)
    await service.invoke_concurrent(make_requests(2), agent_timeout=2.0)
    _batch, agents = _by_kind(exporter.get_finished_spans())
    timed_out = {s.attributes["conclave.agent_id"]: s for s in agents if s.attributes}
    assert [e.name for e in timed_out["archon-2"].events] == ["conclave.timeout"]
    assert timed_out["archon-2"].attributes["error.type"] == "timeout"  # type: ignore[index]
    assert not timed_out["archon-1"].events
    exporter.clear()
    await expect_halt(
        lambda: service.invoke_concurrent(make_requests(3)), lambda: halt_after(switch, 1.0)
    )
    batch, agents = _by_kind(exporter.get_finished_spans())
    assert len(agents) == 3
    assert [e.name for e in batch.events] == ["conclave.halt"]
    assert batch.events[0].attributes == {"conclave.halt.reason": "stop now"}
    assert batch.attributes is not None and batch.attributes["conclave.halt_stop_s"] == 0.0
    assert batch.attributes["error.type"] == "halted"
    halted = {s.attributes["conclave.agent_id"]: s for s in agents if s.attributes}
    for agent in ("archon-2", "archon-3"):
        assert [e.name for e in halted[agent].events] == ["conclave.halt"]
        assert halted[agent].attributes["error.type"] == "halted"  # type: ignore[index]
    assert not halted["archon-1"].events


async def test_a_hedge_is_a_child_span_of_its_agent_and_an_event_on_it(
    autojump_clock: trio.testing.MockClock, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    service = _traced(ScriptedOrchestrator(default=Step(1.0)), provider)
    result = await service.invoke_concurrent(
        make_requests(4), hedge=HedgePolicy(delay=0.5, budget=0.5)
    )
    assert len(result.hedged_agents) == 2
    finished = exporter.get_finished_spans()
    assert len(finished) == 1 + 4 + 2
    hedges = [s for s in finished if _attrs(s).get("conclave.hedge") is True]
    agents = {s.context.span_id: s for s in finished if _attrs(s).get("conclave.hedge") is False}
    assert len(hedges) == 2
    for hedge in hedges:
        assert hedge.parent is not None
        parent = agents[hedge.parent.span_id]
        assert _attrs(parent)["conclave.agent_id"] == _attrs(hedge)["conclave.agent_id"]
        assert [e.name for e in parent.events] == ["conclave.hedge"]


async def test_rate_limit_waits_are_events_of_the_batch(
    autojump_clock: trio.testing.MockClock, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    service = _traced(ScriptedOrchestrator(), provider, rate_limit=RateLimit(per_second=2))
    await service.invoke_concurrent(make_requests(3))
    batch, _agents = _by_kind(exporter.get_finished_spans())
    waits = sorted(float(_attrs(e)["conclave.wait_s"]) for e in batch.events)
    assert waits == pytest.approx([0.0, 0.5, 1.0])


# ---------------------------------------------------------------- OTLP/HTTP, for real


async def test_spans_reach_a_real_otlp_http_collector_as_protobuf() -> None:
    collector = Collector()
    try:
        service = ConcurrentDeliberationService(ScriptedOrchestrator())
        async with otlp_tracing(service, endpoint=collector.endpoint):
            result = await service.invoke_concurrent(make_requests(3))
    finally:
        collector.close()
    received = collector.spans()
    assert sorted(s.name for s in received) == ["chat", "chat", "chat", "conclave.deliberation"]
    [batch] = [s for s in received if s.name == "conclave.deliberation"]
    attributes = {a.key: a.value.string_value for a in batch.attributes}
    assert attributes["conclave.batch_id"] == str(result.batch_id)
    for span in received:
        if span is not batch:
            assert span.parent_span_id == batch.span_id and span.trace_id == batch.trace_id
    resource = collector.requests[0].resource_spans[0].resource
    names = {a.key: a.value.string_value for a in resource.attributes}
    assert names["service.name"] == "conclave"


class _OddMetadata:
    """Answers with metadata UTF-8 cannot encode (a lone surrogate: JSON's "\\ud800")."""

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        await trio.lowlevel.checkpoint()
        metadata = {"model": "m\ud800", "finish_reason": "stop\udc00", "http_statuses": "200"}
        return AgentOutput(agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata)


async def test_metadata_utf8_cannot_encode_never_costs_the_batch_its_spans() -> None:
    # One span named with a lone surrogate failed the OTLP encoding of the whole export
    # (every span queued with it dropped).
    collector = Collector()
    try:
        service = ConcurrentDeliberationService(_OddMetadata())
        async with otlp_tracing(service, endpoint=collector.endpoint):
            await service.invoke_concurrent(make_requests(3))
    finally:
        collector.close()
    received = collector.spans()
    assert len(received) == 4
    calls = [s for s in received if s.name != "conclave.deliberation"]
    assert [s.name for s in calls] == ["chat m\\ud800"] * 3
    for span in calls:
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["gen_ai.response.model"].string_value == "m\\ud800"
        assert list(attributes["gen_ai.response.finish_reasons"].array_value.values) == [
            type(attributes["gen_ai.response.model"])(string_value="stop\\udc00")
        ]


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_BSP_MAX_QUEUE_SIZE", "-1"), ("OTEL_BSP_SCHEDULE_DELAY", "-5")],
)
async def test_a_malformed_otel_setting_is_a_clear_error_that_changes_nothing(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    service = ConcurrentDeliberationService(ScriptedOrchestrator())
    with pytest.raises(InvalidRequestError, match="OTEL_"):
        async with otlp_tracing(service, endpoint="http://127.0.0.1:9/v1/traces"):
            pass
    assert not service.metrics.observers


async def test_a_token_count_beyond_belief_never_costs_the_batch_its_spans() -> None:
    # OTLP's integers are 64-bit: one attribute of 10**400 failed the whole export.
    class Lies:
        async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
            await trio.lowlevel.checkpoint()
            metadata = {"model": "m", "prompt_tokens": 10**400, "completion_tokens": 7}
            return AgentOutput(
                agent_id=agent_id, request_id=uuid4(), content="ok", metadata=metadata
            )

    collector = Collector()
    try:
        service = ConcurrentDeliberationService(Lies())
        async with otlp_tracing(service, endpoint=collector.endpoint):
            await service.invoke_concurrent(make_requests(2))
    finally:
        collector.close()
    calls = [s for s in collector.spans() if s.name == "chat m"]
    assert len(calls) == 2
    for span in calls:
        attributes = {a.key: a.value for a in span.attributes}
        assert "gen_ai.usage.input_tokens" not in attributes
        assert attributes["gen_ai.usage.output_tokens"].int_value == 7


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
async def test_an_unreachable_collector_is_a_warning_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = ConcurrentDeliberationService(ScriptedOrchestrator())
    endpoint = f"http://user:hunter2@127.0.0.1:{_closed_port()}/v1/traces"
    began = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="adapters.tracing"):
        async with otlp_tracing(service, endpoint=endpoint, shutdown_timeout_s=1.0):
            result = await service.invoke_concurrent(make_requests(3))
    took = time.monotonic() - began
    assert result.success_count == 3
    assert took < 6.0  # the 1 s bound and set-up, with room for a loaded machine
    warnings = [r for r in caplog.records if r.name == "adapters.tracing"]
    assert warnings and all("OTLP export" in r.getMessage() for r in warnings)
    assert all("hunter2" not in str(r.__dict__) for r in warnings)


@pytest.mark.slow
async def test_a_collector_that_never_answers_holds_the_exit_only_to_its_bound() -> None:
    collector = Collector(hang=True)
    try:
        service = ConcurrentDeliberationService(ScriptedOrchestrator())
        began = time.monotonic()
        async with otlp_tracing(service, endpoint=collector.endpoint, shutdown_timeout_s=1.0):
            result = await service.invoke_concurrent(make_requests(3))
        took = time.monotonic() - began
    finally:
        collector.close()
    assert result.success_count == 3
    assert took < 6.0  # the 1 s bound and set-up, with room for a loaded machine; not 10 s+


async def test_one_tracer_keeps_apart_the_same_requests_running_in_two_services(
    autojump_clock: trio.testing.MockClock, spans: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = spans
    tracer = DeliberationTracer(provider)
    services = [
        ConcurrentDeliberationService(ScriptedOrchestrator(default=Step(latency)))
        for latency in (1.0, 2.0)
    ]
    for service in services:
        service.metrics.add_observer(tracer)
    requests = make_requests(3)
    async with trio.open_nursery() as nursery:
        for service in services:
            nursery.start_soon(service.invoke_concurrent, requests)
    finished = exporter.get_finished_spans()
    batches = {s.context.span_id: s for s in finished if s.name == "conclave.deliberation"}
    assert len(batches) == 2 and len(finished) == 2 + 6
    for span in finished:
        if span.context.span_id not in batches:
            assert span.parent is not None
            batch = batches[span.parent.span_id]
            assert _attrs(span)["conclave.batch_id"] == _attrs(batch)["conclave.batch_id"]
