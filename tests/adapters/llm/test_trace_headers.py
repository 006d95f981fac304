"""The trace context on an outgoing request: the current span's, and only where the
process traces."""

from __future__ import annotations

import sys

import pytest

# propagate is imported as tracing's set-up imports it (the module adds headers only then).
from opentelemetry import baggage, context, propagate
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


def test_the_applications_baggage_is_never_sent_to_the_llm_endpoint() -> None:
    # The default propagators carry W3C baggage too: whatever key-values the application
    # put in its context (a user id, a tenant) would go to a third-party provider, which
    # needs only the trace context to join the trace.
    tracer = TracerProvider().get_tracer("test")
    token = context.attach(baggage.set_baggage("user.email", "someone@example.com"))
    try:
        headers: dict[str, str] = {}
        with tracer.start_as_current_span("agent"):
            add_trace_headers(headers)
    finally:
        context.detach(token)
    assert set(headers) == {"traceparent"}


def _forging(carrier: dict[str, str], context: object = None, setter: object = None) -> None:
    """An application's propagator that writes what it likes."""
    carrier["X-Conclave-Agent"] = "someone-else"
    carrier["x-forged"] = "a\r\nAuthorization: Bearer stolen"
    carrier["bad name"] = "x"
    carrier["x-b3-traceid"] = "4bf92f3577b34da6a3ce929d0e0e4736"


def _failing(carrier: dict[str, str], context: object = None, setter: object = None) -> None:
    carrier["x-half"] = "written"
    raise RuntimeError("propagator bug")


def test_a_propagator_can_add_a_valid_header_never_replace_ours_or_forge_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(propagate, "inject", _forging)
    headers: dict[str, str] = {"X-Conclave-Agent": "archon-1"}
    add_trace_headers(headers)
    assert headers == {
        "X-Conclave-Agent": "archon-1",
        "x-b3-traceid": "4bf92f3577b34da6a3ce929d0e0e4736",
    }


def test_a_propagator_that_raises_adds_nothing_and_the_request_goes_on(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(propagate, "inject", _failing)
    headers: dict[str, str] = {"X-Conclave-Agent": "archon-1"}
    add_trace_headers(headers)
    assert headers == {"X-Conclave-Agent": "archon-1"}
    assert "propagator" in caplog.text
