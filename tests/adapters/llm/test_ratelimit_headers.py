"""Rate-limit headers as providers send them (OpenAI's ``x-ratelimit-*``, ``Retry-After``):
read within bounds, junk absent, never an exception."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.llm.ratelimit_headers import RateLimitHeaders, parse_duration_s, retry_after_s
from tests.support.helpers import rate_limit_report as report


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
