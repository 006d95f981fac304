"""The LLM-call policy both orchestrators follow: prompts, backoff, Retry-After, failures.

The classification of real failed attempts (statuses, quota, caps, malformed answers) is
tested through the real SDK and the loopback server, in test_bridge.py and
test_http_guard.py (OpenAI) and in crewai/ (CrewAI, the same rules); here, its rules on
their own.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from adapters.llm.policy import (
    KEYLESS,
    OPENAI_API_URL,
    RetryPolicy,
    describe_agent,
    endpoint_from_environment,
    endpoint_source,
    key_from_environment,
    malformed,
    over_content_cap,
    system_prompt_for,
    topic_message,
)
from kernel import ContextBundle, InvalidRequestError


def test_a_topic_that_cannot_be_shared_still_gets_its_message() -> None:
    class Unhashable(ContextBundle):
        __hash__ = None  # type: ignore[assignment]

    assert topic_message(Unhashable("t", "the text", {"k": "v"})) == (
        "Topic t:\n\nthe text\n\nContext:\n- k: v"
    )


def test_a_system_prompt_names_its_agent_and_keeps_its_own_braces() -> None:
    template = 'You are {name} ({agent_id}). Answer as {"vote": "..."}; {other} stays.'
    assert system_prompt_for(template, agent_id="a-1", name="Skeptic") == (
        'You are Skeptic (a-1). Answer as {"vote": "..."}; {other} stays.'
    )


def test_every_failure_names_its_agent_one_way() -> None:
    assert describe_agent("a-1", "m", "http://h/v1") == "agent 'a-1' (m at http://h/v1)"
    assert describe_agent("a-1", "m", "http://h/v1", framework="CrewAI") == (
        "agent 'a-1' (CrewAI, m at http://h/v1)"
    )
    assert str(malformed("agent 'a-1'", "no choices")) == (
        "agent 'a-1': malformed response (no choices)"
    )
    assert str(over_content_cap("agent 'a-1'", 10)) == (
        "agent 'a-1': answer over the 10-character cap (max_content_chars)"
    )
    assert str(RetryPolicy.gave_up("agent 'a-1'", "HTTP 503", 4)) == (
        "agent 'a-1': HTTP 503 after 4 attempt(s)"
    )


def policy(**settings: Any) -> RetryPolicy:
    defaults: dict[str, Any] = {
        "max_retries": 3,
        "backoff_base_s": 0.25,
        "backoff_cap_s": 8.0,
        "retry_after_cap_s": 30.0,
        "seed": 7,
    }
    return RetryPolicy(**(defaults | settings))


def test_backoff_is_decorrelated_jitter_between_the_base_and_the_cap() -> None:
    retry = policy()
    for _ in range(50):
        backoff, previous = retry.backoff(), retry.backoff_base_s
        for _ in range(8):
            wait_s = backoff.next_s()
            assert retry.backoff_base_s <= wait_s <= min(retry.backoff_cap_s, previous * 3)
            previous = wait_s
    waits = [b.next_s() for b in (retry.backoff() for _ in range(72))]
    assert len(set(waits)) > 60  # 72 agents failing together do not retry together


def test_the_same_seed_draws_the_same_backoffs() -> None:
    first, second = policy(seed=3).backoff(), policy(seed=3).backoff()
    assert [first.next_s() for _ in range(5)] == [second.next_s() for _ in range(5)]


def test_a_rate_limit_waits_for_retry_after_within_the_cap() -> None:
    retry = policy(retry_after_cap_s=30.0)
    assert retry.throttled_wait_s(1.0, None) == 1.0  # no Retry-After: the backoff
    assert retry.throttled_wait_s(1.0, 0.5) == 1.0  # never shorter than the backoff
    assert retry.throttled_wait_s(1.0, 12.0) == 12.0
    assert retry.throttled_wait_s(1.0, 1e9) == 30.0  # an absurd header: the cap
    assert policy(retry_after_cap_s=0.5).throttled_wait_s(1.0, None) == 0.5


def test_an_invocation_gets_max_retries_after_its_first_attempt() -> None:
    retry = policy(max_retries=2)
    assert [retry.exhausted(n) for n in (1, 2, 3)] == [False, False, True]


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_retries", -1),
        ("max_retries", True),
        ("max_retries", 1.5),
        ("backoff_base_s", -0.1),
        ("backoff_cap_s", math.nan),
        ("retry_after_cap_s", math.inf),
        ("retry_after_cap_s", "30"),
        ("seed", 1.5),
        ("seed", True),
    ],
)
def test_a_bad_retry_setting_is_refused_naming_it(setting: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=setting):
        policy(**{setting: value})


# ------------------------------------------------------------------ where, and as whom


def test_an_explicit_base_url_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env.example/v1")
    assert endpoint_from_environment("http://given.example/v1") == "http://given.example/v1"
    assert endpoint_source("http://given.example/v1") == "base_url"


def test_without_a_base_url_the_environment_is_next(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://env.example/v1")
    assert endpoint_from_environment(None) == "http://env.example/v1"
    assert endpoint_source(None) == "$OPENAI_BASE_URL"


@pytest.mark.parametrize("env", [None, ""])
def test_without_either_the_openai_api_is_meant(
    monkeypatch: pytest.MonkeyPatch, env: str | None
) -> None:
    if env is None:
        monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    else:  # OPENAI_BASE_URL= in a shell clears it
        monkeypatch.setenv("OPENAI_BASE_URL", env)
    assert endpoint_from_environment(None) == OPENAI_API_URL == "https://api.openai.com/v1"
    assert endpoint_source(None) == "base_url"


def test_the_key_is_the_argument_then_the_environment_then_none(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    assert key_from_environment("sk-given") == "sk-given"
    assert key_from_environment(None) == "sk-env"
    monkeypatch.delenv("OPENAI_API_KEY")
    assert key_from_environment(None) == KEYLESS
