"""kernel.validate: the boundary checks the kernel and the adapters share."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from kernel import (
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltSwitch,
    HedgePolicy,
    InvalidRequestError,
)
from kernel.validate import check_int, check_number, check_seconds, check_text, utf8_text
from tests.support.helpers import ScriptedOrchestrator
from tests.support.hostile_parts import HUGE


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (True, "must be a number"),
        ("1", "must be a number"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        (0, "must be > 0"),
        (10**400, "too large"),
    ],
)
def test_bad_numbers_are_refused_with_the_setting_named(value: object, match: str) -> None:
    with pytest.raises(InvalidRequestError, match=match) as info:
        check_number(value, "rate", above=0)
    assert "rate" in str(info.value)


def test_good_values_come_back_normalised() -> None:
    assert check_number(3, "x", at_least=0, at_most=3) == 3.0
    assert check_number(math.inf, "x", finite=False) == math.inf
    assert check_seconds(0.5, "timeout") == 0.5
    assert check_int(4, "n", at_least=1) == 4
    assert check_text("agent-1", "agent_id") == "agent-1"
    for bad in (True, 1.5):
        with pytest.raises(InvalidRequestError):
            check_int(bad, "n")
    for blank in ("", "   ", None):
        with pytest.raises(InvalidRequestError):
            check_text(blank, "agent_id")


@pytest.mark.parametrize(
    "build",
    [
        lambda: check_number(HUGE, "x"),
        lambda: check_seconds(HUGE, "x"),
        lambda: HedgePolicy(delay=HUGE),
        lambda: HedgePolicy(budget=HUGE),
        lambda: HedgePolicy(quantile=-HUGE),
        lambda: ConcurrentDeliberationService(ScriptedOrchestrator(), agent_timeout=HUGE),
        lambda: ConcurrentDeliberationService(ScriptedOrchestrator(), halt_read_timeout=HUGE),
        lambda: ConcurrentDeliberationService(ScriptedOrchestrator(), deadline=HUGE),
        lambda: DualChannelHaltChecker(HaltSwitch(), HaltSwitch(), read_timeout=HUGE),
    ],
)
def test_an_int_too_large_for_a_float_is_invalid_input(build: Callable[[], object]) -> None:
    """Guards against: ``OverflowError: int too large to convert to float`` out of every check."""
    with pytest.raises(InvalidRequestError, match="too large"):
        build()


def test_utf8_text_escapes_lone_surrogates_and_keeps_other_text_as_it_is() -> None:
    assert utf8_text("gpt-4o") == "gpt-4o"
    assert utf8_text("modèle-名前 😀") == "modèle-名前 😀"
    escaped = utf8_text("m\ud800x\udfff")
    assert escaped == "m\\ud800x\\udfff"
    escaped.encode("utf-8")  # encodes now
