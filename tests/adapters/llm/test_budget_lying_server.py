"""The provider budget against a server that lies in its rate-limit headers or usage.

Whatever a response says, no single report may make the endpoint wait longer than the
caller's cap on a 429 pause (``max_pause_s``, the orchestrator's ``retry_after_cap_s``):
otherwise one absurd header stalls every agent of the endpoint for years (there is no
agent timeout by default, and a turn waits before the HTTP timeout starts).
"""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.llm.provider_budget import EndpointBudget, ProviderLimits, shared_budget
from adapters.llm.ratelimit_headers import RateLimitHeaders
from kernel import ContextBundle
from tests.support.fake_openai import FakeOpenAIServer

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


def test_an_advertised_limit_far_below_what_the_endpoint_served_is_not_believed() -> None:
    clock = Clock()
    b = EndpointBudget(clock=clock)
    served = [b.reserve(100.0) for _ in range(10)]
    for ticket in served:
        assert b.try_send(ticket) == 0
    for ticket in served[:-1]:
        b.finish(ticket, RateLimitHeaders(), used_tokens=100, max_pause_s=CAP_S)
    # 10 requests and 1000 tokens answered within the minute: "1 a minute" is a lie...
    lie = {"x-ratelimit-limit-requests": "1", "x-ratelimit-limit-tokens": "10"}
    b.finish(served[-1], RateLimitHeaders.parse(lie), used_tokens=100, max_pause_s=CAP_S)
    assert (b.requests.rate, b.tokens.rate) == (None, None)
    assert b.next_turn(100.0) == clock.now  # nothing holds the next one back
    # ...but a limit a sliding minute could honestly have served is followed.
    honest = b.reserve(100.0)
    assert b.try_send(honest) == 0
    report = {"x-ratelimit-limit-requests": "6", "x-ratelimit-limit-tokens": "600"}
    b.finish(honest, RateLimitHeaders.parse(report), used_tokens=100, max_pause_s=CAP_S)
    assert (b.requests.rate, b.tokens.rate) == (6 / 60, 600 / 60)


def test_the_callers_own_limits_space_turns_further_than_the_cap() -> None:
    # The cap bounds what a server says; a limit the caller configured is believed in full.
    clock = Clock()
    b = EndpointBudget(clock=clock)
    b.configure(ProviderLimits(requests_per_minute=1))
    first = b.reserve(1.0)
    assert b.try_send(first) == 0
    b.finish(first, RateLimitHeaders(), used_tokens=1, max_pause_s=CAP_S)
    assert b.next_turn(1.0) - clock.now == pytest.approx(60 / 0.95)


# ---------------------------------------------------------------- over real HTTP

# Each lie as the server tells it: (headers on every answer, usage it reports or None).
LIES: dict[str, tuple[dict[str, str], int | None]] = {
    "limit-tokens 1": ({"x-ratelimit-limit-tokens": "1"}, None),
    "limit-requests 1": ({"x-ratelimit-limit-requests": "1"}, None),
    "remaining 0, reset in 30 years": (
        {
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "262800h",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "262800h",
        },
        None,
    ),
    "remaining-tokens 1e15, then a usage of 1e15": (
        {"x-ratelimit-limit-tokens": "1000000", "x-ratelimit-remaining-tokens": "1e15"},
        10**15,
    ),
    "negative": (
        {"x-ratelimit-limit-tokens": "-5", "x-ratelimit-remaining-requests": "-1"},
        None,
    ),
    "NaN": ({"x-ratelimit-limit-requests": "NaN", "x-ratelimit-reset-tokens": "nan"}, None),
    "1e400": ({"x-ratelimit-limit-tokens": "1e400", "x-ratelimit-remaining-tokens": "1e400"}, None),
    "huge usage": ({"x-ratelimit-limit-tokens": "100000"}, 10**30),
}
HTTP_CAP_S = 0.5


@pytest.mark.parametrize("lie", LIES)
def test_a_lying_server_never_makes_the_next_request_wait_longer_than_the_cap(
    llm_server: FakeOpenAIServer, lie: str
) -> None:
    headers, usage = LIES[lie]
    llm_server.default = ("lie", headers, usage)
    key = f"sk-liar-{uuid.uuid4().hex}"  # a budget of its own
    orch = OpenAIChatOrchestrator(
        llm_server.base_url, "fake-model", api_key=key, retry_after_cap_s=HTTP_CAP_S
    )
    context = ContextBundle("t", "Adopt the budget?")
    budget = shared_budget(llm_server.base_url, key)
    estimate = 100.0

    async def agent_after_agent() -> list[float]:
        waits = []
        try:
            for n in range(4):
                before = time.monotonic()
                # The wait a request made now would get, before it is made: a stall of
                # hours shows here at once, without waiting for it.
                waits.append(budget.next_turn(estimate) - before)
                assert waits[-1] <= HTTP_CAP_S + 2.0, (lie, n, waits)  # a stall is hours
                await asyncio.wait_for(orch.invoke(f"archon-{n}", context), 30)
        finally:
            await orch.aclose()
        return waits

    waits = asyncio.run(agent_after_agent())
    assert llm_server.answered == 4, (lie, waits)


# ---------------------------------------------------------------- any report at all

_NUMBERS = st.one_of(
    st.integers(min_value=-(10**20), max_value=10**400).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "-0", "0", "1", "0.0001", "1e15", ""]),
    st.text(max_size=12),
)
_DURATIONS = st.one_of(
    _NUMBERS,
    st.sampled_from(["262800h", "1000000000s", "6m0s", "20ms", "1h2m3.5s", "-1s"]),
)
_REPORTS = st.fixed_dictionaries(
    {},
    optional={
        "x-ratelimit-limit-requests": _NUMBERS,
        "x-ratelimit-limit-tokens": _NUMBERS,
        "x-ratelimit-remaining-requests": _NUMBERS,
        "x-ratelimit-remaining-tokens": _NUMBERS,
        "x-ratelimit-reset-requests": _DURATIONS,
        "x-ratelimit-reset-tokens": _DURATIONS,
        "retry-after": _DURATIONS,
        "retry-after-ms": _NUMBERS,
    },
)
_USAGES = st.one_of(
    st.none(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(min_value=0, max_value=10**30).map(float),
)
_ANSWERS = st.tuples(_REPORTS, _USAGES, st.booleans(), st.floats(0, 120))


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.lists(_ANSWERS, min_size=1, max_size=3), min_size=1, max_size=8),
    estimate=st.floats(1, 1e6),
)
def test_no_report_makes_a_turn_wait_past_the_cap_nor_a_debt_beyond_a_minute(
    steps: list[list[tuple[dict[str, str], float | None, bool, float]]], estimate: float
) -> None:
    clock = Clock()
    b = EndpointBudget(clock=clock)
    for answers in steps:
        # A few requests in flight at once, answered with whatever the server says.
        tickets = [b.reserve(estimate) for _ in answers]
        previous = clock.now
        for ticket in tickets:
            # Each turn at most the cap after the one before it (or after its reservation).
            assert ticket.at - max(previous, ticket.reserved_at) <= CAP_S + 1e-6
            clock.now = max(clock.now, ticket.at)
            assert b.try_send(ticket) == 0
            previous = ticket.at
        for ticket, (headers, used, throttled, later_s) in zip(tickets, answers, strict=True):
            clock.now += later_s
            b.finish(
                ticket,
                RateLimitHeaders.parse(headers),
                used_tokens=used,
                throttled=throttled,
                max_pause_s=CAP_S,
            )
            assert b.paused_until - clock.now <= CAP_S + 1e-6
            assert b.next_turn(estimate) - clock.now <= CAP_S + 1e-6
            for lane in (b.requests, b.tokens):
                assert lane.debt(clock.now) <= lane.minute * (1 + 1e-9) + 1e-6
