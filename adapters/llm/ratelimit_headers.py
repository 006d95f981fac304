"""What a provider's response says about its rate limits: the ``x-ratelimit-*`` headers
and ``Retry-After``.

OpenAI (and the many servers that copy it: Azure, Groq, vLLM behind LiteLLM, ...)
sends, per response::

    x-ratelimit-limit-requests: 500          the limit, per minute
    x-ratelimit-remaining-requests: 499      what is left of it now
    x-ratelimit-reset-requests: 120ms        how long until it is back to the full limit
    x-ratelimit-limit-tokens / -remaining-tokens / -reset-tokens   the same, for tokens

and on a 429 ``Retry-After`` (delta-seconds or an HTTP-date; RFC 9110 section 10.2.3)
and sometimes ``retry-after-ms`` (milliseconds, the precise one: Azure and OpenAI send
it; the openai SDK reads it first, as we do).

Durations are Go-style (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``; units ``h m s
ms us ns``); a bare number is seconds.  Parsing never raises: a header that is missing,
malformed, negative, NaN or infinite is simply absent (None), so a misbehaving server
cannot break a call, only fail to inform the budget.
"""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Mapping

import attrs

__all__ = ["LaneHeaders", "RateLimitHeaders", "parse_duration_s", "retry_after_s"]

_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# One "<number><unit>" piece; "ms" before "m" and "s" so the alternation takes the longest.
_PIECE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_MAX_HEADER = 64  # longer values are not durations or counts; do not even look


def _header(headers: Mapping[str, str], name: str) -> str:
    """The header's value, stripped; empty if missing or too long to be a count or time."""
    value = (headers.get(name) or "").strip()
    return value if len(value) <= _MAX_HEADER else ""


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def parse_duration_s(value: str | None) -> float | None:
    """Seconds in a Go-style duration (``"1h2m3.5s"``) or a bare number; None if it is
    not one (empty, malformed, negative, NaN, infinite)."""
    if not value:
        return None
    text = value.strip()
    if not text or len(text) > _MAX_HEADER:
        return None
    bare = _number(text)
    if bare is not None:
        return bare
    total, pos = 0.0, 0
    for match in _PIECE.finditer(text):
        if match.start() != pos:
            return None  # something between pieces that is not a piece
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or pos == 0:
        return None
    return total if math.isfinite(total) else None


def retry_after_s(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """How long the server asks to wait: ``retry-after-ms``, else ``Retry-After``
    (seconds, or an HTTP-date measured against ``now``, the wall clock by default);
    None without either or if neither parses.  Never negative."""
    ms = _number(_header(headers, "retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    value = _header(headers, "retry-after")
    if not value:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
        if when.tzinfo is None:  # an HTTP-date is GMT; a date without a zone is not one
            return None
        return max(0.0, when.timestamp() - (time.time() if now is None else now))
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


@attrs.frozen
class LaneHeaders:
    """One dimension (requests or tokens) as a response reported it; None: not sent.

    ``limit_per_minute`` is >= 1 when present; ``remaining`` and ``reset_s`` >= 0.
    """

    limit_per_minute: float | None = None
    remaining: float | None = None
    reset_s: float | None = None

    @property
    def exhausted(self) -> bool:
        """The server said nothing is left (remaining 0)."""
        return self.remaining is not None and self.remaining < 1


@attrs.frozen
class RateLimitHeaders:
    """Everything one response said about rate limits."""

    requests: LaneHeaders = LaneHeaders()
    tokens: LaneHeaders = LaneHeaders()
    retry_after_s: float | None = None

    @classmethod
    def parse(cls, headers: Mapping[str, str] | None) -> RateLimitHeaders:
        """Read ``headers`` (case-insensitive, like httpx's); never raises."""
        if headers is None or not _any_rate_limit_header(headers):
            # Most answers of most servers: nothing to read, and nothing built.
            return _NOTHING
        return cls(
            requests=_lane(headers, "requests"),
            tokens=_lane(headers, "tokens"),
            retry_after_s=retry_after_s(headers),
        )

    @property
    def present(self) -> bool:
        """Whether the response carried any rate-limit information at all."""
        return self != _NOTHING

    def reset_after_429_s(self) -> float | None:
        """How long a 429 asks the endpoint to pause: ``retry-after-ms``/``Retry-After``
        if sent; else the reset of the dimension that ran out (the longer, if both
        did, or if none says which); None if the response says nothing."""
        if self.retry_after_s is not None:
            return self.retry_after_s
        lanes = [lane for lane in (self.requests, self.tokens) if lane.exhausted]
        resets = [lane.reset_s for lane in lanes or (self.requests, self.tokens)]
        known = [r for r in resets if r is not None]
        return max(known) if known else None


_NOTHING = RateLimitHeaders()
_PREFIXES = ("x-ratelimit-", "retry-after")


def _any_rate_limit_header(headers: Mapping[str, str]) -> bool:
    """Whether any header is one :meth:`RateLimitHeaders.parse` reads (``retry-after``,
    ``retry-after-ms``, ``x-ratelimit-*``): one pass over the names."""
    return any(name.lower().startswith(_PREFIXES) for name in headers)


def _lane(headers: Mapping[str, str], what: str) -> LaneHeaders:
    def get(kind: str) -> str:
        return _header(headers, f"x-ratelimit-{kind}-{what}")

    limit = _number(get("limit"))
    return LaneHeaders(
        # A limit is a count per minute: 0 would pause forever, and a fraction of one
        # (a lying server's "0.0001") would space requests days apart.
        limit_per_minute=limit if limit is not None and limit >= 1 else None,
        remaining=_number(get("remaining")),
        reset_s=parse_duration_s(get("reset")),
    )
