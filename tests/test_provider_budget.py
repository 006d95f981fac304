"""The provider budget's pieces without HTTP: the headers it reads, its plan of turns
(on a hand-driven clock), its sharing across threads and loops, and its registry.

The real-HTTP behaviour (the openai SDK against the rate-limited loopback server) is in
test_provider_limits.py.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import math
import threading
import time
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.openai_chat import OpenAIChatOrchestrator, ProviderLimits, estimate_tokens
from adapters.provider_budget import HEADROOM, EndpointBudget, Ticket, shared_budget
from adapters.ratelimit_headers import RateLimitHeaders, parse_duration_s, retry_after_s
from kernel import InvalidRequestError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def budget(**limits: int) -> tuple[EndpointBudget, Clock]:
    clock = Clock()
    b = EndpointBudget(clock=clock)
    b.configure(ProviderLimits(**limits))
    return b, clock


def send(b: EndpointBudget, clock: Clock, ticket: Ticket) -> None:
    """Move the clock to the ticket's turn and send it."""
    clock.now = max(clock.now, ticket.at)
    assert b.try_send(ticket) == 0


def report(**headers: str) -> RateLimitHeaders:
    return RateLimitHeaders.parse({k.replace("_", "-"): v for k, v in headers.items()})


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


# ---------------------------------------------------------------- headers


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("1.5s", 1.5),
        ("500us", 0.0005),
        ("0s", 0.0),
        ("2", 2.0),
        ("0.25", 0.25),
        (" 7ms ", 0.007),
    ],
)
def test_durations_are_read_as_go_writes_them(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", [None, "", "s", "1x", "-1s", "1s2", "ms", "nan", "inf", "1 s", "1s-2s", "9" * 80]
)
def test_what_is_not_a_duration_is_absent(text: str | None) -> None:
    assert parse_duration_s(text) is None


def test_retry_after_prefers_milliseconds_then_seconds_then_a_date() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_s({"retry-after": "3"}) == 3.0
    now = 1_700_000_000.0
    date = "Tue, 14 Nov 2023 22:13:40 GMT"  # now + 20 s
    assert retry_after_s({"retry-after": date}, now=now) == pytest.approx(20.0)
    assert retry_after_s({"retry-after": date}, now=now + 60) == 0.0  # past: at once
    for junk in ("soon", "-5", "nan", "Tue, 14 Nov 2023 22:13:40"):  # no zone: not HTTP
        assert retry_after_s({"retry-after": junk}, now=now) is None
    assert retry_after_s({}) is None


_HEADER_NAMES = [
    f"x-ratelimit-{kind}-{lane}"
    for kind in ("limit", "remaining", "reset")
    for lane in ("requests", "tokens")
] + ["retry-after", "retry-after-ms"]


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(_HEADER_NAMES), st.text(max_size=80)))
def test_no_header_value_breaks_the_parser(headers: dict[str, str]) -> None:
    parsed = RateLimitHeaders.parse(headers)
    for lane in (parsed.requests, parsed.tokens):
        for value in (lane.limit_per_minute, lane.remaining, lane.reset_s):
            assert value is None or (math.isfinite(value) and value >= 0)
        assert lane.limit_per_minute != 0
    pause = parsed.reset_after_429_s()
    assert pause is None or (math.isfinite(pause) and pause >= 0)


def test_openai_headers_are_read_per_lane() -> None:
    parsed = report(
        x_ratelimit_limit_requests="500",
        x_ratelimit_remaining_requests="0",
        x_ratelimit_reset_requests="120ms",
        x_ratelimit_limit_tokens="30000",
        x_ratelimit_remaining_tokens="29000",
        x_ratelimit_reset_tokens="2s",
    )
    assert parsed.requests.limit_per_minute == 500
    assert parsed.requests.exhausted and not parsed.tokens.exhausted
    assert parsed.tokens.reset_s == 2.0
    # No Retry-After: the reset of the lane that ran out, not the longer other one.
    assert parsed.reset_after_429_s() == pytest.approx(0.12)
    assert report(retry_after="4", x_ratelimit_reset_tokens="9s").reset_after_429_s() == 4.0
    assert report(x_ratelimit_reset_tokens="9s").reset_after_429_s() == 9.0
    assert not RateLimitHeaders.parse({"content-type": "application/json"}).present
    assert RateLimitHeaders.parse(None).reset_after_429_s() is None


def test_a_limit_of_zero_or_junk_is_ignored_not_obeyed() -> None:
    parsed = report(x_ratelimit_limit_requests="0", x_ratelimit_remaining_tokens="lots")
    assert parsed.requests.limit_per_minute is None
    assert parsed.tokens.remaining is None
    assert not parsed.present


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
    from adapters import provider_budget

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
    assert loose._budgets[url] is strict._budgets[url]
    assert other._budgets[url] is not loose._budgets[url]
    shared = loose._budgets[url]
    assert shared.requests.rate == pytest.approx(1.0)  # 60 per minute: the stricter
    assert shared.tokens.rate == pytest.approx(10**6 / 60)
    assert other._budgets[url].requests.rate is None


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
