"""The W3C trace context of the current span, put on an outgoing HTTP request.

So that a proxy or a provider can join the trace: the agent's span
(:mod:`adapters.tracing`) is the parent of whatever they record.  Through OpenTelemetry's
configured propagator (W3C ``traceparent``/``tracestate`` by default, ``OTEL_PROPAGATORS``
otherwise), and only where the process traces: the propagator is used once it has been
imported (tracing's set-up does that), never imported here on a request's path, and
without a current span it adds nothing.
"""

from __future__ import annotations

import sys
from collections.abc import MutableMapping

__all__ = ["add_trace_headers"]


def add_trace_headers(headers: MutableMapping[str, str]) -> None:
    """Add the current span's trace context to ``headers`` (nothing if none)."""
    propagate = sys.modules.get("opentelemetry.propagate")
    if propagate is not None:
        propagate.inject(headers)
