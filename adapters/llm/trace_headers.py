"""The W3C trace context of the current span, put on an outgoing HTTP request.

So that a proxy or a provider can join the trace: the agent's span
(:mod:`adapters.tracing`) is the parent of whatever they record.  Through OpenTelemetry's
configured propagator (W3C ``traceparent``/``tracestate`` by default, ``OTEL_PROPAGATORS``
otherwise), and only where the process traces: the propagator is used once it has been
imported (tracing's set-up does that), never imported here on a request's path, and
without a current span it adds nothing.

What a propagator writes is the application's, and the request goes to a third party:
W3C ``baggage`` (the application's own key-values: a user id, a tenant) is never sent, a
header the request already has is never replaced, a name or value that is not a valid
header is left out, and a propagator that raises adds nothing (logged).
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping

__all__ = ["add_trace_headers"]

log = logging.getLogger(__name__)

#: Headers a propagator may write that are never sent (lower case).
NOT_SENT = frozenset({"baggage"})
# RFC 9110: a header name is a token; a value here, printable ASCII (no CR/LF to forge
# another header, nothing httpx would refuse, failing the call).
_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_VALUE = re.compile(r"[\x20-\x7e]*")


def add_trace_headers(headers: MutableMapping[str, str]) -> None:
    """Add the current span's trace context to ``headers`` (nothing if none)."""
    propagate = sys.modules.get("opentelemetry.propagate")
    if propagate is None:
        return
    found: dict[str, str] = {}
    try:
        propagate.inject(found)
    except Exception as exc:  # the application's propagator: its bug is not the call's
        log.warning(
            "trace propagator raised; no trace headers", extra={"error_type": type(exc).__name__}
        )
        return
    have = {name.lower() for name in headers}
    for name, value in found.items():
        if (
            isinstance(name, str)
            and isinstance(value, str)
            and name.lower() not in NOT_SENT
            and name.lower() not in have
            and _NAME.fullmatch(name)
            and _VALUE.fullmatch(value)
        ):
            headers[name] = value
