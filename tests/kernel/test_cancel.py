"""Telling an asked-for cancellation from a stray one, and surfacing what matters from a
nursery's exception group."""

from __future__ import annotations

import pytest
import trio

from kernel._cancel import cancel_requested, raise_if_requested, surface


async def test_a_cancellation_is_requested_only_inside_a_cancelled_scope() -> None:
    assert not cancel_requested()
    with trio.CancelScope() as scope:  # noqa: ASYNC100 - the question, not a checkpoint
        scope.cancel()
        assert cancel_requested()
    assert not cancel_requested()


async def test_a_stray_cancelled_is_handed_back_and_a_requested_one_reraised() -> None:
    stray = trio.Cancelled._create()
    raise_if_requested(stray)  # nobody asked: returns, for the caller to handle
    with trio.CancelScope() as scope:  # noqa: ASYNC100 - the question, not a checkpoint
        scope.cancel()
        with pytest.raises(trio.Cancelled) as info:
            raise_if_requested(stray)
        assert info.value is stray


def test_surface_finds_the_first_leaf_that_is_not_a_cancellation() -> None:
    interrupt = KeyboardInterrupt()
    nested = BaseExceptionGroup(
        "outer",
        [trio.Cancelled._create(), BaseExceptionGroup("inner", [interrupt, SystemExit()])],
    )
    assert surface(nested) is interrupt
    only_cancelled = BaseExceptionGroup("g", [trio.Cancelled._create()])
    assert surface(only_cancelled) is only_cancelled
