"""The trace context on an outgoing request: the current span's, and only where the
process traces."""

from __future__ import annotations

import sys

import pytest
from opentelemetry import propagate  # noqa: F401 - loaded, as tracing's set-up loads it
from opentelemetry.sdk.trace import TracerProvider

from adapters.llm.trace_headers import add_trace_headers


def test_the_current_spans_context_is_added_as_a_w3c_traceparent() -> None:
    tracer = TracerProvider().get_tracer("test")
    headers: dict[str, str] = {"X-Conclave-Agent": "a"}
    with tracer.start_as_current_span("agent") as span:
        add_trace_headers(headers)
    version, trace_id, span_id, _flags = headers["traceparent"].split("-")
    assert version == "00"
    assert int(trace_id, 16) == span.get_span_context().trace_id
    assert int(span_id, 16) == span.get_span_context().span_id
    assert headers["X-Conclave-Agent"] == "a"


def test_nothing_is_added_without_a_current_span() -> None:
    headers: dict[str, str] = {}
    add_trace_headers(headers)
    assert headers == {}


def test_nothing_is_added_or_imported_where_the_process_does_not_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delitem(sys.modules, "opentelemetry.propagate")
    tracer = TracerProvider().get_tracer("test")
    headers: dict[str, str] = {}
    with tracer.start_as_current_span("agent"):
        add_trace_headers(headers)
    assert headers == {}
    assert "opentelemetry.propagate" not in sys.modules
