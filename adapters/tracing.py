"""OpenTelemetry traces of a service's batches: a span per batch, a child span per agent call.

    async with otlp_tracing(service):          # OTLP/HTTP, configured by OTEL_* variables
        await service.invoke_concurrent(requests)

or, with a tracer provider of the application's own::

    service.metrics.add_observer(DeliberationTracer(provider))

Spans (needs the ``otel`` extra):

* ``conclave.deliberation`` -- one per batch (INTERNAL): ``conclave.batch_id``,
  ``conclave.batch_size``, ``conclave.mode``, and at its end ``conclave.success_count``,
  ``conclave.failure_count``, ``conclave.halt_stop_s`` (after a halt).  Events:
  ``conclave.halt`` (``conclave.halt.reason``), ``conclave.deadline``, ``conclave.quorum``
  when the batch is stopped early, ``conclave.rate_limit_wait`` (``conclave.agent_id``,
  ``conclave.wait_s``) for each wait on the service's rate limit.
* ``chat {model}`` -- one per agent call, and one per hedge (a duplicate call), children of
  the batch's span (CLIENT), after the OpenTelemetry GenAI semantic conventions:
  ``gen_ai.operation.name`` = ``chat``, ``gen_ai.request.model`` and
  ``gen_ai.response.model``, ``gen_ai.usage.input_tokens`` / ``output_tokens``,
  ``gen_ai.response.finish_reasons``, ``error.type`` on a failure (the exception's class,
  else the failure kind), plus ``conclave.batch_id``, ``conclave.agent_id``,
  ``conclave.request_id``, ``conclave.outcome``, ``conclave.hedge`` and
  ``conclave.http_statuses``.  Events: ``conclave.timeout``, ``conclave.halt``,
  ``conclave.hedge`` (a duplicate launched).  What the LLM adapter reports in its metadata
  is what the span says: a stub's spans carry no model.

The agent's span is the current span while its call runs (the kernel delivers its start
in the call's own task), across the trio-asyncio bridge too: the OpenAI adapter sends it as
the W3C ``traceparent`` of its HTTP request (:mod:`adapters.llm.trace_headers`), so a proxy
or a provider joins the trace.

Prompts and answers are never recorded unless ``record_content=True``; then the topic is
``gen_ai.input.messages`` and the answer ``gen_ai.output.messages`` (JSON, as the
conventions' opt-in content attributes).

Export never blocks the trio loop: spans are handed to a ``BatchSpanProcessor``, whose own
thread exports them; set-up (imports, the exporter) runs in a worker thread on entry, and
the final flush on exit is bounded (``shutdown_timeout_s``).  An endpoint that cannot be
reached is a logged warning (the spans are dropped); the deliberation goes on unchanged.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import trio

from adapters.urls import redact_url
from adapters.usage import token_count
from kernel import (
    ConcurrentDeliberationService,
    InvalidRequestError,
    KernelEvent,
)
from kernel.events import (
    AgentEnded,
    AgentStarted,
    BatchEnded,
    BatchStarted,
    BatchStopping,
    HedgeEnded,
    HedgeStarted,
    RateLimitWaited,
)
from kernel.validate import check_number, utf8_text

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )
    from opentelemetry.trace import Span, SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - the extra is in the test environment
    raise ImportError(
        "adapters.tracing needs the 'otel' extra: pip install 'conclave-kernel[otel]'"
    ) from exc

__all__ = ["DeliberationTracer", "ReportingExporter", "otlp_tracing"]

log = logging.getLogger("adapters.tracing")

_INSTRUMENTATION = "conclave-kernel"
#: Where the SDK's exporter reads its endpoint (for the warnings' sake: it reads them itself).
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


class DeliberationTracer:
    """A :class:`~kernel.KernelObserver` that turns a service's batches into spans.

    Args:
        tracer_provider: where spans go (default: the global provider, which is a no-op
            until the application installs one).
        record_content: record prompts and answers (default off: they stay out of traces).
    """

    def __init__(
        self, tracer_provider: trace.TracerProvider | None = None, *, record_content: bool = False
    ) -> None:
        if not isinstance(record_content, bool):
            raise InvalidRequestError(
                f"record_content must be a bool, got {type(record_content).__name__}"
            )
        self._tracer = trace.get_tracer(_INSTRUMENTATION, tracer_provider=tracer_provider)
        self._record_content = record_content
        self._batches: dict[UUID, Span] = {}
        # By (batch, request): one tracer may watch several services, and the same
        # requests may run in two of them at once.
        self._agents: dict[tuple[UUID, UUID], Span] = {}
        self._hedges: dict[tuple[UUID, UUID], Span] = {}

    def observe(self, event: KernelEvent) -> None:
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    # ------------------------------------------------------------ batches

    def _batch_started(self, event: BatchStarted) -> None:
        span = self._tracer.start_span(
            "conclave.deliberation",
            kind=SpanKind.INTERNAL,
            attributes={
                "conclave.batch_id": str(event.batch_id),
                "conclave.batch_size": event.size,
                "conclave.mode": event.mode,
            },
        )
        self._batches[event.batch_id] = span

    def _batch_stopping(self, event: BatchStopping) -> None:
        span = self._batches.get(event.batch_id)
        if span is None:
            return
        attributes = {} if event.reason is None else {"conclave.halt.reason": event.reason}
        span.add_event(f"conclave.{event.cause}", attributes)

    def _rate_limit_waited(self, event: RateLimitWaited) -> None:
        span = self._batches.get(event.batch_id)
        if span is not None:
            span.add_event(
                "conclave.rate_limit_wait",
                {"conclave.agent_id": event.agent_id, "conclave.wait_s": event.seconds},
            )

    def _batch_ended(self, event: BatchEnded) -> None:
        span = self._batches.pop(event.batch_id, None)
        if span is None:
            return
        result = event.result
        span.set_attribute("conclave.success_count", result.success_count)
        span.set_attribute("conclave.failure_count", result.failure_count)
        if event.halt_stop_s is not None:
            span.set_attribute("conclave.halt_stop_s", event.halt_stop_s)
        if event.halted:
            span.set_attribute("error.type", "halted")
            span.set_status(Status(StatusCode.ERROR, "halted"))
        span.end()

    # ------------------------------------------------------------ calls

    def _call_span(self, batch_id: UUID, agent_id: str, request_id: UUID, hedge: bool) -> Span:
        parent = self._agents.get((batch_id, request_id)) if hedge else self._batches.get(batch_id)
        span = self._tracer.start_span(
            "chat",
            context=None if parent is None else trace.set_span_in_context(parent),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": "chat",
                "conclave.batch_id": str(batch_id),
                "conclave.agent_id": agent_id,
                "conclave.request_id": str(request_id),
                "conclave.hedge": hedge,
            },
        )
        # The current span for the rest of this task: the call it is about to make. The
        # task makes no other call (the kernel's promise), so nothing needs detaching.
        otel_context.attach(trace.set_span_in_context(span))
        return span

    def _agent_started(self, event: AgentStarted) -> None:
        span = self._call_span(event.batch_id, event.agent_id, event.request_id, False)
        if self._record_content and event.context is not None:
            messages = [{"role": "user", "parts": [_text(event.context.topic_content)]}]
            span.set_attribute("gen_ai.input.messages", json.dumps(messages))
        self._agents[event.batch_id, event.request_id] = span

    def _hedge_started(self, event: HedgeStarted) -> None:
        agent = self._agents.get((event.batch_id, event.request_id))
        if agent is not None:
            agent.add_event("conclave.hedge")
        span = self._call_span(event.batch_id, event.agent_id, event.request_id, True)
        self._hedges[event.batch_id, event.request_id] = span

    def _agent_ended(self, event: AgentEnded) -> None:
        span = self._agents.pop((event.batch_id, event.request_id), None)
        if span is None:
            return
        attributes: dict[str, Any] = {"conclave.hedge_won": event.hedge_won}
        if event.outcome != "ok":
            attributes["error.type"] = event.error_type or event.outcome
        _describe_call(span, event.outcome, event.metadata, attributes)
        if event.outcome in ("timeout", "halted"):
            span.add_event(f"conclave.{'halt' if event.outcome == 'halted' else 'timeout'}")
        if event.outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, event.outcome))
        elif self._record_content and event.output is not None:
            answer: dict[str, Any] = {"role": "assistant", "parts": [_text(event.output.content)]}
            finish = event.output.metadata.get("finish_reason")
            if finish:
                answer["finish_reason"] = str(finish)
            span.set_attribute("gen_ai.output.messages", json.dumps([answer]))
        span.end()

    def _hedge_ended(self, event: HedgeEnded) -> None:
        span = self._hedges.pop((event.batch_id, event.request_id), None)
        if span is None:
            return
        failed = event.outcome == "error"
        _describe_call(
            span, event.outcome, event.metadata, {"error.type": "error"} if failed else {}
        )
        if failed:
            span.set_status(Status(StatusCode.ERROR, "error"))
        span.end()


_HANDLERS: dict[type, Any] = {
    BatchStarted: DeliberationTracer._batch_started,
    BatchStopping: DeliberationTracer._batch_stopping,
    RateLimitWaited: DeliberationTracer._rate_limit_waited,
    BatchEnded: DeliberationTracer._batch_ended,
    AgentStarted: DeliberationTracer._agent_started,
    HedgeStarted: DeliberationTracer._hedge_started,
    AgentEnded: DeliberationTracer._agent_ended,
    HedgeEnded: DeliberationTracer._hedge_ended,
}


def _text(content: str) -> dict[str, str]:
    return {"type": "text", "content": content}


def _describe_call(
    span: Span,
    outcome: str,
    metadata: Mapping[str, str | int | float],
    attributes: dict[str, Any],
) -> None:
    """What the call's adapter reported, as GenAI attributes (never content), with
    ``attributes``, set at once (each call into the span takes its lock)."""
    attributes["conclave.outcome"] = outcome
    # utf8_text: what an orchestrator reports may hold a lone surrogate, and one span
    # that OTLP cannot encode costs every span exported with it.
    model = metadata.get("model")
    if isinstance(model, str) and model:
        model = utf8_text(model)
        span.update_name(f"chat {model}")
        attributes["gen_ai.request.model"] = attributes["gen_ai.response.model"] = model
    tokens = token_count(metadata.get("prompt_tokens"))
    if tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = tokens
    tokens = token_count(metadata.get("completion_tokens"))
    if tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = tokens
    finish = metadata.get("finish_reason")
    if isinstance(finish, str) and finish:
        attributes["gen_ai.response.finish_reasons"] = (utf8_text(finish),)
    statuses = metadata.get("http_statuses")
    if isinstance(statuses, str) and statuses:
        attributes["conclave.http_statuses"] = utf8_text(statuses)
    span.set_attributes(attributes)


# ---------------------------------------------------------------- export


class ReportingExporter(SpanExporter):
    """An exporter that says when its spans could not be delivered: the first failure
    is a warning (with the endpoint, its secrets redacted), the rest are counted and
    summed up at shutdown.  Runs in the span processor's thread."""

    def __init__(self, inner: SpanExporter, endpoint: str) -> None:
        self._inner = inner
        self.endpoint = redact_url(endpoint) if endpoint else "(the SDK's default)"
        self.failed_batches = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
        except Exception:  # an exporter bug must not end the processor's thread
            log.exception("OTLP export raised; spans dropped")
            result = SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.failed_batches += 1
            if self.failed_batches == 1:
                log.warning(
                    "OTLP export failed; spans dropped (the deliberation goes on)",
                    extra={"endpoint": self.endpoint, "spans": len(spans)},
                )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()
        if self.failed_batches:
            log.warning(
                "OTLP export failed for some span batches; they were dropped",
                extra={"endpoint": self.endpoint, "failed_batches": self.failed_batches},
            )

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


def _otlp_provider(endpoint: str | None) -> tuple[TracerProvider, ReportingExporter]:
    """A provider exporting OTLP/HTTP (endpoint, headers, timeout, service name,
    sampler from the standard ``OTEL_*`` variables unless ``endpoint`` is given)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: "conclave"}
    provider = TracerProvider(resource=Resource.create(defaults))
    inner = OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()
    named = endpoint or next((os.environ[v] for v in _ENDPOINT_VARIABLES if os.environ.get(v)), "")
    exporter = ReportingExporter(inner, named)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _ = propagate.inject  # the propagator the LLM adapter uses, loaded here, not per request
    return provider, exporter


@asynccontextmanager
async def otlp_tracing(
    service: ConcurrentDeliberationService,
    *,
    endpoint: str | None = None,
    record_content: bool = False,
    shutdown_timeout_s: float = 5.0,
) -> AsyncIterator[DeliberationTracer]:
    """Trace ``service``'s batches to an OTLP/HTTP endpoint while in the block.

    ``endpoint``: the traces URL (``http://host:4318/v1/traces``); default: the
    ``OTEL_EXPORTER_OTLP_*`` variables, else the SDK's default (localhost:4318).  On exit
    the spans still queued are flushed, for ``shutdown_timeout_s`` at most (then
    dropped, with a warning): a collector that is down never holds the caller up longer.
    An ``OTEL_*`` setting the SDK refuses (``OTEL_BSP_MAX_QUEUE_SIZE=-1``) raises
    :class:`~kernel.InvalidRequestError` on entry, nothing traced.
    """
    if not isinstance(service, ConcurrentDeliberationService):
        raise InvalidRequestError(f"expected a ConcurrentDeliberationService, got {service!r}")
    limit = check_number(shutdown_timeout_s, "shutdown_timeout_s", above=0)
    if endpoint is not None and not isinstance(endpoint, str):
        raise InvalidRequestError(f"endpoint must be a URL string, got {type(endpoint).__name__}")
    try:
        provider, exporter = await trio.to_thread.run_sync(_otlp_provider, endpoint)
    except ValueError as exc:  # the SDK refused an OTEL_* setting (OTEL_BSP_* < 1)
        batching = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith("OTEL_BSP_"))
        said = f" ({', '.join(batching)})" if batching else ""
        raise InvalidRequestError(
            f"the OpenTelemetry SDK refuses the OTEL_* settings: {exc}{said}"
        ) from None
    tracer = DeliberationTracer(provider, record_content=record_content)
    service.metrics.add_observer(tracer)
    try:
        yield tracer
    finally:
        service.metrics.remove_observer(tracer)
        # Shielded from the caller's cancellation (a halted CLI still flushes what it
        # has), bounded all the same: a shutdown stuck on a dead collector is left to its
        # (daemon) thread once the bound is reached.
        with trio.CancelScope(shield=True), trio.move_on_after(limit) as bounded:
            await trio.to_thread.run_sync(provider.shutdown, abandon_on_cancel=True)
        if bounded.cancelled_caught:
            log.warning(
                "OTLP export did not finish in time (collector down or slow?); "
                "queued spans dropped",
                extra={"endpoint": exporter.endpoint, "timeout_s": limit},
            )
