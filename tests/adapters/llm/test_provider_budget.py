"""The provider budget: its plan of turns (on a hand-driven clock), its sharing across
threads and loops, and its registry; then a server that lies in its rate-limit headers
or usage (no report may make the endpoint wait past the caller's cap); then the real-HTTP
behaviour (the openai SDK against the rate-limited loopback server).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import math
import os
import re
import subprocess
import threading
import time
import uuid
import weakref
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator, estimate_tokens
from adapters.llm.provider_budget import (
    HEADROOM,
    EndpointBudget,
    ProviderLimits,
    Ticket,
    cluster_budget,
    shared_budget,
)
from adapters.llm.ratelimit_headers import RateLimitHeaders
from kernel import (
    AgentOutput,
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
)
from tests.support.cli import conclave as run_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import make_requests, time_halt
from tests.support.helpers import rate_limit_report as report


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def budget(**limits: int) -> tuple[EndpointBudget, Clock]:
    clock = Clock()
    b = EndpointBudget(clock=clock)
    b.configure(ProviderLimits(limits.get("requests_per_minute"), limits.get("tokens_per_minute")))
    return b, clock


def send(b: EndpointBudget, clock: Clock, ticket: Ticket) -> None:
    """Move the clock to the ticket's turn and send it."""
    clock.now = max(clock.now, ticket.at)
    assert b.try_send(ticket) == 0


PACE = 1 - HEADROOM


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, 1.5, True, "60"])
@pytest.mark.parametrize("field", ["requests_per_minute", "tokens_per_minute"])
def test_provider_limits_refuse_what_is_not_a_positive_int(field: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError, match=f"^{field} must be "):
        ProviderLimits(**{field: value})


def test_provider_limits_may_leave_either_unset() -> None:
    assert ProviderLimits(requests_per_minute=60).tokens_per_minute is None
    assert ProviderLimits() == ProviderLimits(None, None)


def test_the_orchestrator_refuses_limits_that_are_not_provider_limits() -> None:
    with pytest.raises(InvalidRequestError, match="limits must be a ProviderLimits"):
        OpenAIChatOrchestrator("http://127.0.0.1:1/v1", "m", limits={"rpm": 60})  # type: ignore[arg-type]


def test_the_token_estimate_is_prompt_bytes_over_4_plus_the_completion() -> None:
    messages = [{"role": "system", "content": "x" * 40}, {"role": "user", "content": "é" * 10}]
    # 40 + 20 UTF-8 bytes -> 15, 4 per message, 3 for the reply, then max_tokens.
    assert estimate_tokens(messages, 100) == 15 + 8 + 3 + 100
    assert estimate_tokens(messages, None) == 15 + 8 + 3 + 256


# ---------------------------------------------------------------- the plan


def test_requests_are_paced_evenly_in_reservation_order() -> None:
    b, _ = budget(requests_per_minute=600)  # 10/s, paced at 9.5/s
    turns = [b.reserve(1.0).at for _ in range(5)]
    assert turns == pytest.approx([i / (10 * PACE) for i in range(5)])


def test_without_limits_nothing_waits() -> None:
    b, _ = budget()
    assert [b.reserve(100.0).at for _ in range(72)] == [0.0] * 72


def test_tokens_pace_by_estimate_and_the_real_usage_moves_waiting_turns_earlier() -> None:
    b, clock = budget(tokens_per_minute=60_000)  # 1000 tokens/s, paced at 950/s
    first = b.reserve(950.0)
    second = b.reserve(95.0)
    assert first.at == 0.0
    assert second.at == pytest.approx(1.0)  # waits for the first one's estimate
    send(b, clock, first)
    b.finish(first, None, used_tokens=95.0, max_pause_s=30)
    assert second.at == pytest.approx(0.1)  # settled: only the 95 it used count
    assert b.next_turn(0) == pytest.approx(0.2)


def test_a_reservation_given_back_consumes_nothing() -> None:
    b, clock = budget(requests_per_minute=600)
    gap = 1 / (10 * PACE)
    first, second, third = (b.reserve(1.0) for _ in range(3))
    send(b, clock, first)
    b.cancel(second)
    assert third.at == pytest.approx(gap)  # moved up into the freed turn
    b.cancel(third)
    assert b.pending == 0
    assert b.next_turn() == pytest.approx(gap)  # as if neither had ever reserved
    b.cancel(third)  # twice: no-op
    b.cancel(first)  # already sent: no-op
    assert b.next_turn() == pytest.approx(gap)


def test_a_429_pauses_every_waiting_turn_and_keeps_their_spacing() -> None:
    b, clock = budget(requests_per_minute=600)
    gap = 1 / (10 * PACE)
    first = b.reserve(1.0)
    send(b, clock, first)
    waiting = [b.reserve(1.0) for _ in range(3)]
    clock.now = 0.01
    pause = b.finish(first, report(retry_after_ms="500"), throttled=True, max_pause_s=30)
    assert pause == 0.5
    assert b.paused_until == pytest.approx(0.51)
    assert [t.at for t in waiting] == pytest.approx([0.51, 0.51 + gap, 0.51 + 2 * gap])
    assert b.next_turn() == pytest.approx(0.51 + 3 * gap)


def test_a_pause_is_capped_and_one_without_a_reset_is_the_callers() -> None:
    b, clock = budget()
    first, second = b.reserve(1.0), b.reserve(1.0)
    send(b, clock, first)
    send(b, clock, second)
    assert b.finish(first, report(retry_after="3600"), throttled=True, max_pause_s=2) == 2
    assert b.paused_until == 2.0
    assert b.finish(second, RateLimitHeaders(), throttled=True, max_pause_s=2) is None
    b.pause(5)
    assert b.next_turn() == 5.0


def test_the_servers_remaining_count_is_followed_less_what_was_sent_since() -> None:
    b, clock = budget()  # no limits of ours: the server's headers are all there is
    sent = [b.reserve(1.0) for _ in range(4)]
    for ticket in sent:
        send(b, clock, ticket)
    # The first one's answer: 2 left (at the server, when it arrived); 3 went after it.
    headers = report(x_ratelimit_limit_requests="600", x_ratelimit_remaining_requests="2")
    b.finish(sent[0], headers, max_pause_s=30)
    # One in debt: the next needs 2 units at the server's 10/s.
    assert b.next_turn() == pytest.approx(0.2)
    # Then paced at 95 % of the limit the server advertised.
    assert [b.reserve(1.0).at for _ in range(2)] == pytest.approx([0.2, 0.2 + 1 / 9.5])


def test_a_server_with_room_does_not_slow_a_configured_pace() -> None:
    b, clock = budget(requests_per_minute=600)
    first, second = b.reserve(1.0), b.reserve(1.0)
    send(b, clock, first)
    headers = report(x_ratelimit_limit_requests="6000", x_ratelimit_remaining_requests="90")
    b.finish(first, headers, max_pause_s=30)
    assert second.at == pytest.approx(1 / 9.5)  # ours is the stricter limit


# ---------------------------------------------------------------- across threads and loops


def test_one_budget_paces_waiters_on_two_threads_and_loops_as_one_queue() -> None:
    b = EndpointBudget()
    b.configure(ProviderLimits(requests_per_minute=6000))  # paced at 95/s
    tickets: list[Ticket] = []
    lock = threading.Lock()

    async def agent() -> None:
        ticket = await b.acquire(1.0)
        with lock:
            tickets.append(ticket)

    async def council() -> None:
        await asyncio.gather(*(agent() for _ in range(10)))

    threads = [threading.Thread(target=asyncio.run, args=(council(),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    turns = sorted(t.at for t in tickets)
    assert len(turns) == 20
    gaps = [later - earlier for earlier, later in itertools.pairwise(turns)]
    # One queue: no two turns closer than the pace (two budgets would pair them up).
    assert min(gaps) >= 1 / 95 - 1e-9
    assert all(t.sent_at is not None and t.sent_at >= t.at for t in tickets)


def test_a_turn_moved_earlier_wakes_its_waiter_on_another_loop() -> None:
    b = EndpointBudget()
    b.configure(ProviderLimits(tokens_per_minute=60_000))  # 1 000 tokens/s
    first = b.reserve(9500.0)  # the next turn waits ~10 s for this estimate
    assert b.try_send(first) == 0
    woke: list[float] = []

    async def waiter() -> None:
        ticket = await b.acquire(10.0)
        woke.append(time.monotonic() - ticket.reserved_at)

    thread = threading.Thread(target=asyncio.run, args=(waiter(),))
    thread.start()
    deadline = time.monotonic() + 5
    while b.pending == 0 and time.monotonic() < deadline:  # until the other has reserved
        time.sleep(0.001)
    assert b.turns()[0] - time.monotonic() > 5
    b.finish(first, None, used_tokens=10.0, max_pause_s=30)  # far less than estimated
    thread.join(20)
    assert woke and woke[0] < 5  # woken when its turn moved, not at the old one (~10 s)


def test_a_waiter_cancelled_before_its_turn_gives_it_back() -> None:
    b = EndpointBudget()
    b.configure(ProviderLimits(requests_per_minute=6))

    async def main() -> None:
        await b.acquire(1.0)  # at once
        waiting = asyncio.ensure_future(b.acquire(1.0))  # ~10.5 s away
        await asyncio.sleep(0)
        assert b.pending == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting

    before = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - before < 5  # not its turn, 10.5 s away
    assert b.pending == 0
    assert b.next_turn() - before < 10 / PACE + 5  # one turn after the first, not two


# ---------------------------------------------------------------- the registry


def test_one_budget_per_endpoint_and_key() -> None:
    a = shared_budget("http://127.0.0.1:9/v1", "sk-key-a")
    assert shared_budget("http://127.0.0.1:9/v1/", "sk-key-a") is a  # trailing slash
    assert shared_budget("http://127.0.0.1:9/v1", "sk-key-b") is not a
    assert shared_budget("http://127.0.0.1:10/v1", "sk-key-a") is not a
    assert "sk-key" not in repr(a)


def test_the_registry_never_holds_the_key_and_forgets_unused_budgets() -> None:
    from adapters.llm import provider_budget

    secret = "sk-do-not-keep-me"
    held = shared_budget("http://127.0.0.1:11/v1", secret)
    assert all(secret not in part for key in provider_budget._registry for part in key)
    gone = weakref.ref(held)
    del held
    gc.collect()
    assert gone() is None  # nobody uses it: the registry did not keep it alive


def test_orchestrators_of_one_endpoint_and_key_share_the_strictest_limits() -> None:
    url = "http://127.0.0.1:12/v1"
    loose = OpenAIChatOrchestrator(url, "m", api_key="k12", limits=ProviderLimits(600, 10**6))
    strict = OpenAIChatOrchestrator(url, "m", api_key="k12", limits=ProviderLimits(60))
    other = OpenAIChatOrchestrator(url, "m", api_key="k12-other")
    loose.prepare()
    strict.prepare()
    other.prepare()
    assert loose._budget(url) is strict._budget(url)
    assert other._budget(url) is not loose._budget(url)
    shared = loose._budget(url)
    assert isinstance(shared, EndpointBudget)
    assert shared.requests.rate == pytest.approx(1.0)  # 60 per minute: the stricter
    assert shared.tokens.rate == pytest.approx(10**6 / 60)
    alone = other._budget(url)
    assert isinstance(alone, EndpointBudget) and alone.requests.rate is None


# ------------------------------------------- a server that lies in its rate-limit headers or usage


def test_a_limit_believed_once_is_dropped_when_what_was_served_proves_it_a_lie() -> None:
    # The first answer's "1 a minute" is believed (nothing served yet to doubt it); the
    # answers to the nine already sent repeat it after ten were served within the
    # minute: the lie is then doubted, and the limit believed before must go with it.
    b, clock = budget()
    sent = [b.reserve(100.0) for _ in range(10)]
    for ticket in sent:
        send(b, clock, ticket)
    lie = report(x_ratelimit_limit_requests="1", x_ratelimit_limit_tokens="10")
    b.finish(sent[0], lie, used_tokens=100, max_pause_s=30)
    assert b.requests.rate == pytest.approx(1 / 60)
    for ticket in sent[1:]:
        b.finish(ticket, lie, used_tokens=100, max_pause_s=30)
    assert (b.requests.rate, b.tokens.rate) == (None, None)
    assert b.next_turn(100.0) == clock.now


def test_a_lie_dropped_leaves_only_the_callers_own_pace() -> None:
    b, clock = budget(requests_per_minute=600)
    sent = [b.reserve(1.0) for _ in range(10)]
    for ticket in sent:
        send(b, clock, ticket)
    lie = report(x_ratelimit_limit_requests="1")
    b.finish(sent[0], lie, max_pause_s=30)
    for ticket in sent[1:]:
        b.finish(ticket, lie, max_pause_s=30)
    # Ten sent at 600 a minute (95 %): the next ones go when our own pace says.
    assert [b.reserve(1.0).at for _ in range(2)] == pytest.approx([10 / 9.5, 11 / 9.5])


CAP_S = 30.0


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


# ---------------------------------------------------------------- provider limits over real HTTP


W = 1.0  # the server's window: its "minute"
N = 120  # requests per window
RPM = round(N * 60 / W)  # the same limit, per minute, as a client configures it
FAST: dict[str, Any] = {"backoff_base_s": 0.01, "backoff_cap_s": 0.2, "timeout_s": 10.0}


def orchestrator(server: FakeOpenAIServer, **kwargs: Any) -> OpenAIChatOrchestrator:
    """An orchestrator with an API key nobody else uses (a budget of its own)."""
    key = f"sk-test-{uuid.uuid4().hex}"
    return OpenAIChatOrchestrator(server.base_url, "fake-model", api_key=key, **FAST, **kwargs)


async def run_batches(
    orch: OpenAIChatOrchestrator, batches: int, size: int = 72
) -> list[ConcurrentResult]:
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
        return [await service.invoke_concurrent(make_requests(size)) for _ in range(batches)]


def admitted(server: FakeOpenAIServer, key: str | None = None) -> list[float]:
    """Arrival times of the chat completions the server admitted (of one key)."""
    return sorted(t for t, k, status in server.arrivals if status == 200 and key in (None, k))


def rate(times: list[float]) -> float:
    """Requests per second from the first arrival to the last."""
    return (len(times) - 1) / (times[-1] - times[0])


def busiest_window(times: list[float]) -> int:
    """The most arrivals in any window of W seconds."""
    times, most, start = sorted(times), 0, 0
    for end, t in enumerate(times):
        while times[start] <= t - W:
            start += 1
        most = max(most, end - start + 1)
    return most


def outputs(results: list[ConcurrentResult]) -> list[AgentOutput]:
    return [o for r in results for o in r.outputs]


def key_of(orch: OpenAIChatOrchestrator) -> str:
    return f"Bearer {orch._api_key}"


async def test_with_the_servers_limits_no_call_is_refused(llm_server: FakeOpenAIServer) -> None:
    llm_server.limit_rate(N, 10**7, W)
    orch = orchestrator(llm_server, limits=ProviderLimits(requests_per_minute=RPM))
    results = await run_batches(orch, 3)

    assert [r.success_count for r in results] == [72, 72, 72]
    assert llm_server.rate_limited == 0
    times = admitted(llm_server)
    assert len(times) == 216
    # Never more than the server's limit in any of its windows.  (How close to the limit
    # the pacing runs is a speed, measured by the rate-limited benchmark, not here.)
    assert busiest_window(times) <= N
    waited = [float(o.metadata["rate_limited_ms"]) for o in outputs(results)]
    assert sum(w > 0 for w in waited) > 200  # nearly every agent waited its turn
    stats = orch.limit_stats()
    assert (stats.attempts, stats.responses_429) == (216, 0)
    assert stats.waited_ms == pytest.approx(sum(waited), rel=1e-3, abs=1)


async def test_without_limits_the_headers_and_the_shared_pause_keep_429s_rare(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.limit_rate(N, 10**7, W)
    orch = orchestrator(llm_server)  # no limits: only what the server says
    results = await run_batches(orch, 3)

    assert [r.success_count for r in results] == [72, 72, 72]  # every agent succeeds
    # A handful, not a storm: agents retrying alone meet 24-48 (the rate-limited benchmark);
    # timing on a loaded machine moves the handful, so the bound leaves it room.
    assert llm_server.rate_limited <= 12
    # The server admitted no more than its limit in any window (how close to it the
    # pacing runs is the rate-limited benchmark's business).
    assert busiest_window(admitted(llm_server)) <= N
    attempts = sum(int(o.metadata["attempts"]) for o in outputs(results))
    assert attempts == 216 + llm_server.rate_limited
    stats = orch.limit_stats()
    assert (stats.attempts, stats.responses_429) == (attempts, llm_server.rate_limited)


async def test_two_orchestrators_on_one_endpoint_and_key_share_one_budget(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.limit_rate(N, 10**7, W)
    limits = ProviderLimits(requests_per_minute=RPM)
    first = orchestrator(llm_server, limits=limits)
    second = OpenAIChatOrchestrator(
        llm_server.base_url, "fake-model", api_key=first._api_key, limits=limits, **FAST
    )
    results: list[ConcurrentResult] = []
    loops: list[object] = []

    async def council(orch: OpenAIChatOrchestrator, prefix: str) -> None:
        async with AsyncioOrchestratorBridge(orch) as bridge:  # each on a loop of its own
            loops.append(bridge._loop)
            service = ConcurrentDeliberationService(bridge, HaltSwitch(), AgentPool())
            results.append(await service.invoke_concurrent(make_requests(72, prefix=prefix)))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(council, first, "a")
        nursery.start_soon(council, second, "b")

    assert loops[0] is not loops[1]
    assert [r.success_count for r in results] == [72, 72]
    # Each alone would take the whole limit: together they never exceeded it.
    assert llm_server.rate_limited == 0
    times = admitted(llm_server)
    assert len(times) == 144
    assert busiest_window(times) <= N
    assert rate(times) <= N / W


async def test_orchestrators_with_different_keys_do_not_share(
    llm_server: FakeOpenAIServer,
) -> None:
    per_key = 60
    llm_server.limit_rate(per_key, 10**7, W)  # per key
    limits = ProviderLimits(requests_per_minute=round(per_key * 60 / W))
    orchs = [orchestrator(llm_server, limits=limits) for _ in range(2)]

    async with trio.open_nursery() as nursery:
        for orch in orchs:
            nursery.start_soon(run_batches, orch, 1, 48)

    assert llm_server.rate_limited == 0
    for orch in orchs:
        assert len(admitted(llm_server, key_of(orch))) == 48
    # More in one window than one key's limit allows: two budgets, side by side.
    assert busiest_window(admitted(llm_server)) > per_key


async def test_a_429_pauses_every_agent_of_the_endpoint_until_the_reset(
    llm_server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="adapters")
    llm_server.script_any(("429", 0.3))  # the first call: a plain 429, Retry-After 0.3 s
    # A turn every ~53 ms, so the others are still waiting when the 429 comes back.
    orch = orchestrator(llm_server, limits=ProviderLimits(requests_per_minute=1200))
    (result,) = await run_batches(orch, 1, size=6)

    assert result.success_count == 6
    (refused, first), *rest = sorted(llm_server.arrived)
    later = [t for t, _ in rest]
    assert len(later) == 6  # five others, and the refused one's retry
    assert min(later) >= refused + 0.3  # nobody fired into the pause
    gaps = [b - a for a, b in itertools.pairwise(later)]
    assert min(gaps) >= 0.5 / (20 * (1 - HEADROOM))  # and after it, still paced
    assert orch.limit_stats().responses_429 == 1
    output = next(o for o in result.outputs if o.agent_id == first)
    assert output.metadata["attempts"] == 2
    assert float(output.metadata["rate_limited_ms"]) >= 300
    (paused,) = [r for r in caplog.records if r.getMessage() == "endpoint paused after HTTP 429"]
    assert (paused.base_url, paused.pause_s) == (llm_server.base_url, 0.3)  # type: ignore[attr-defined]
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert orch._api_key not in logged


async def test_a_halt_while_agents_wait_for_budget_is_prompt_and_consumes_nothing(
    llm_server: FakeOpenAIServer,
) -> None:
    # 60 a minute: one turn now, the next ~1.05 s later, the tenth ~9.5 s later.
    orch = orchestrator(llm_server, limits=ProviderLimits(requests_per_minute=60))
    budget = shared_budget(llm_server.base_url, orch._api_key)
    halt = HaltSwitch()
    second_turn: list[float] = []
    async with AsyncioOrchestratorBridge(orch) as bridge:
        service = ConcurrentDeliberationService(bridge, halt, AgentPool())

        async def while_waiting() -> None:
            await trio.to_thread.run_sync(llm_server.wait_for, lambda s: s.answered == 1)
            while budget.pending < 9:  # noqa: ASYNC110 (until the nine others reserved)
                await trio.sleep(0.001)
            # What the second turn would be if nobody else were waiting: turn 2 of the plan.
            second_turn.append(budget.turns()[0])

        err, took = await time_halt(
            lambda: service.invoke_concurrent(make_requests(10)), halt, while_waiting
        )

    assert took < 0.1  # prompt
    assert err.partial is not None
    assert [f.kind for f in err.partial.failures].count(FailureKind.HALTED) >= 9
    assert llm_server.requests_total == 1
    # Consumed nothing: the next turn is the one the second agent had, not the eleventh.
    assert budget.pending == 0
    assert budget.next_turn() == pytest.approx(second_turn[0], abs=0.01)


async def test_the_token_budget_is_settled_with_the_real_usage(
    llm_server: FakeOpenAIServer,
) -> None:
    tokens = 3000  # per window; the request limit is out of reach
    llm_server.limit_rate(10**6, tokens, W)
    orch = orchestrator(
        llm_server, max_tokens=50, limits=ProviderLimits(tokens_per_minute=tokens * 60)
    )
    (result,) = await run_batches(orch, 1)

    assert result.success_count == 72
    assert llm_server.rate_limited == 0
    used = [
        int(o.metadata["prompt_tokens"]) + int(o.metadata["completion_tokens"])
        for o in result.outputs
    ]
    assert sum(used) > 1.2 * tokens  # the token limit is what paced them
    # Each was reserved at its estimate (prompt + max_tokens, about twice what it used),
    # then settled: the throughput follows the usage, not the estimate.
    # Charged at the estimate, the batch could use at most about half the token rate;
    # settled, it runs near the full rate.  The bound sits between the two, with room
    # for a loaded machine (which only makes the batch slower, never faster).
    times = admitted(llm_server)
    token_rate = (sum(used) - used[0]) / (times[-1] - times[0])
    assert token_rate >= 0.6 * tokens / W


# ---------------------------------------------------------------- the CLI


def conclave(*args: str, key: str = "sk-cli") -> subprocess.CompletedProcess[str]:
    """The CLI with ``key`` as its API key (the server keeps a budget per key)."""
    return run_cli(*args, env={**os.environ, "OPENAI_API_KEY": key})


def test_the_cli_paces_at_rpm_and_reports_what_rate_limits_cost(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.limit_rate(60, 10**7, W)  # fewer than 72 a window: a burst would be refused
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", llm_server.base_url,
        "--model", "fake-model", "--rpm", str(round(60 * 60 / W)), "--quiet",
        key=f"sk-cli-{uuid.uuid4().hex}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "72/72 succeeded" in proc.stdout
    waited = re.search(
        r"rate limits: ([\d.]+) s waiting for budget \(all agents\), 0 x HTTP 429", proc.stdout
    )
    assert waited is not None, proc.stdout
    assert float(waited.group(1)) > 1.0  # 72 agents took turns over more than a second
    assert llm_server.rate_limited == 0


def test_the_cli_refuses_bad_rate_limits_before_running() -> None:
    proc = conclave("deliberate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1",
                    "--model", "m", "--rpm", "0")  # fmt: skip
    assert proc.returncode == 2
    assert "--rpm: must be >= 1, got 0" in proc.stderr
    proc = conclave("deliberate", "--tpm", "1000")  # the stub backend has no provider
    assert proc.returncode == 2
    assert "--rpm and --tpm are the LLM backends'" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- a budget shared by replicas


class _ReachableStore:
    """A shared store that is always reachable and never called (the checks come first)."""

    replicas = 1
    available = True

    async def reserve(self, *args: Any) -> Any:
        raise AssertionError("not reached")

    def settle(self, bid: str, **kwargs: Any) -> None: ...

    def pause(self, bid: str, seconds: float) -> None: ...

    def watch(self, bid: str, listener: Any) -> Any:
        return lambda: None

    def on_available(self, listener: Any) -> Any:
        return lambda: None


def test_a_shared_budget_used_outside_trio_says_it_needs_the_bridge() -> None:
    store = _ReachableStore()
    budget = cluster_budget("http://127.0.0.1:13/v1", "k13", store)
    with pytest.raises(RuntimeError, match="AsyncioOrchestratorBridge"):
        asyncio.run(budget.acquire(1.0))


def test_provider_limits_with_a_shared_store_keep_the_lanes_and_the_store() -> None:
    store = _ReachableStore()
    limits = ProviderLimits(60, 6000, shared=store)
    assert (limits.requests_per_minute, limits.tokens_per_minute, limits.shared) == (
        60,
        6000,
        store,
    )
