"""The provider budget against a server that lies in its rate-limit headers or usage.

Whatever a response says, no single report may make the endpoint wait longer than the
caller's cap on a 429 pause (``max_pause_s``, the orchestrator's ``retry_after_cap_s``):
otherwise one absurd header stalls every agent of the endpoint for years (there is no
agent timeout by default, and a turn waits before the HTTP timeout starts).
"""

from __future__ import annotations

from adapters.provider_budget import EndpointBudget, ProviderLimits
from adapters.ratelimit_headers import RateLimitHeaders

CAP_S = 30.0


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def after_one_answer(
    headers: dict[str, str], *, used: float | None = None, limits: ProviderLimits | None = None
) -> float:
    """Send one request, settle it with ``headers`` and ``used``; how long the next waits."""
    clock = Clock()
    b = EndpointBudget(clock=clock)
    b.configure(limits)
    ticket = b.reserve(100.0)
    assert b.try_send(ticket) == 0
    b.finish(ticket, RateLimitHeaders.parse(headers), used_tokens=used, max_pause_s=CAP_S)
    return b.next_turn(100.0) - clock.now


def test_a_reset_of_a_billion_seconds_waits_no_longer_than_the_cap() -> None:
    for lane in ("requests", "tokens"):
        headers = {
            f"x-ratelimit-remaining-{lane}": "0",
            f"x-ratelimit-reset-{lane}": "1000000000s",
        }
        assert 0 < after_one_answer(headers) <= CAP_S, lane


def test_an_advertised_limit_below_one_a_minute_is_not_obeyed() -> None:
    # Limits are counts per minute; "0.0001" would space requests 7 days apart.
    headers = {"x-ratelimit-limit-requests": "0.0001", "x-ratelimit-remaining-requests": "5"}
    parsed = RateLimitHeaders.parse(headers)
    assert parsed.requests.limit_per_minute is None
    clock = Clock()
    b = EndpointBudget(clock=clock)
    first, second = b.reserve(1.0), b.reserve(1.0)
    assert b.try_send(first) == 0
    b.finish(first, parsed, max_pause_s=CAP_S)
    assert second.at - clock.now <= CAP_S


def test_a_usage_of_a_quadrillion_tokens_counts_as_at_most_a_minute_of_the_limit() -> None:
    # A request larger than the per-minute token limit is refused by the server, so no
    # honest usage is larger: a lie must not put the lane 2 million years in debt.
    minute = 60 / 0.95  # one minute of the limit, at the budget's pace
    configured = ProviderLimits(tokens_per_minute=1000)
    assert 0 < after_one_answer({}, used=1e15, limits=configured) <= minute + 1
    advertised = {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "900"}
    assert 0 <= after_one_answer(advertised, used=1e15) <= minute + 1
    # Below the bound, the real usage still counts in full.
    assert after_one_answer({}, used=500, limits=configured) > 400 * 60 / 950
