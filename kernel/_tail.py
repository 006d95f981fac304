"""Tail control: a batch deadline, a quorum, and hedged calls for slow agents.

LLM latency is heavy-tailed, and a batch takes as long as its slowest agent.  Three
tools bound that, each optional per batch: a deadline for the whole batch, a quorum (stop
once K agents have answered), and hedging: an agent still running after a delay gets one
duplicate call, and the first success wins (Dean & Barroso, "The Tail at Scale", CACM
2013: deferring the hedge to the 95th percentile costs a few percent of extra calls and
cuts the far tail most).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import attrs
import trio

from kernel._errors import InvalidRequestError
from kernel._metrics import nearest_rank
from kernel._slot import Slot
from kernel.validate import check_int, check_seconds, integer, number

__all__ = [
    "HedgePolicy",
    "LatencyWindow",
    "check_deadline",
    "check_hedge",
    "check_quorum",
    "race",
    "watch_deadline",
]

T = TypeVar("T")

# Hedging on an observed quantile follows how the service behaves now: a window of the
# most recent successful agent latencies, like the batch percentiles in the metrics.
_LATENCY_WINDOW = 1024


def _optional_delay(_inst: object, _attr: object, value: float | None) -> None:
    if value is not None:
        check_seconds(value, "delay")


@attrs.frozen(slots=True)
class HedgePolicy:
    """When a still-running agent gets one duplicate call.

    Args:
        delay: seconds after the agent's start; ``None`` means "the ``quantile`` of this
            service's recent successful agent latencies", once it has ``min_samples`` of
            them (before that, nothing is hedged).
        quantile: 0 < quantile <= 1, for the observed delay.
        budget: 0 <= budget <= 1: at most ``ceil(budget * len(requests))`` agents of a
            batch are hedged (of a resumed batch: of the agents the run invokes).
        min_samples: >= 1 latencies before an observed delay is trusted.

    A hedge needs a free pool slot and holds it while it runs (FR10 counts calls, not
    agents), and never jumps agents queued for a slot.  A call that failed does not
    trigger a hedge: that is what retries are for.
    """

    delay: float | None = attrs.field(default=None, validator=_optional_delay)
    quantile: float = attrs.field(default=0.95, validator=number(above=0, at_most=1))
    budget: float = attrs.field(default=0.1, validator=number(at_least=0, at_most=1))
    min_samples: int = attrs.field(default=20, validator=integer(at_least=1))

    def max_hedged(self, batch_size: int) -> int:
        """How many agents of a batch of ``batch_size`` may be hedged."""
        # round() first: 0.1 * 30 is 3.0000000000000004, and ceil() must not make it 4.
        return math.ceil(round(self.budget * batch_size, 9))

    def delay_for(self, window: LatencyWindow) -> float | None:
        """The hedge delay for a batch starting now, or None (not enough samples yet)."""
        if self.delay is not None:
            return self.delay
        if len(window) < self.min_samples:
            return None
        return window.quantile(self.quantile)


class LatencyWindow(collections.deque[float]):
    """The most recent successful agent latencies (seconds) of one service.

    A bounded deque (``append`` is the service's hot path: one C call per agent) with
    the quantile hedging asks for.
    """

    def __init__(self, size: int = _LATENCY_WINDOW) -> None:
        super().__init__(maxlen=size)

    def quantile(self, q: float) -> float:
        """Nearest-rank quantile (0 < q <= 1) of the window; raises if it is empty."""
        if not self:
            raise ValueError("no latencies yet")
        return nearest_rank(sorted(self), q)


def check_deadline(value: object) -> float | None:
    return None if value is None else check_seconds(value, "deadline")


def check_quorum(value: object, batch_size: int) -> int | None:
    if value is None:
        return None
    quorum = check_int(value, "quorum", at_least=1)
    if quorum > batch_size:
        shown = quorum if quorum < 10**15 else "an int of more than 15 digits"
        raise InvalidRequestError(
            f"quorum must be between 1 and the batch size ({batch_size}), got {shown}"
        )
    return quorum


def check_hedge(value: object) -> HedgePolicy | None:
    if value is not None and not isinstance(value, HedgePolicy):
        raise InvalidRequestError(
            f"hedge must be a HedgePolicy or None, got {type(value).__name__}"
        )
    return value


# ---------------------------------------------------------------- mechanism


async def watch_deadline(deadline: float, stop: Callable[[], None]) -> None:
    """Call ``stop`` at ``deadline`` (trio clock), unless cancelled first."""
    await trio.sleep_until(deadline)
    stop()


async def race(
    call: Callable[[], Awaitable[T]],
    wins: Callable[[T], bool],
    hedge_at: float,
    take_slot: Callable[[], Awaitable[Slot | None]],
    release: Callable[[Slot], None],
    on_hedge_won: Callable[[], None],
    hedge_call: Callable[[], Awaitable[T]] | None = None,
) -> T:
    """Race ``call`` against one duplicate of it started at ``hedge_at``.

    The first answer that ``wins`` is returned and the other call is cancelled.  A call
    that fails leaves the other running; if both fail, the first call's answer stands.
    The duplicate starts only if the first call is still running at ``hedge_at`` and
    ``take_slot`` gives it a slot (None: it may not start); it runs under the slot's
    guard (a lost lease drops it) and gives the slot back with ``release``.  The
    duplicate is ``hedge_call`` if given (the same call, observed), else ``call``.
    """
    state = _Race(call, wins, on_hedge_won, hedge_call or call)
    async with trio.open_nursery() as state.nursery:
        state.nursery.start_soon(state.first)
        state.nursery.start_soon(state.hedge, hedge_at, take_slot, release)
    return state.answer()


class _Race(Generic[T]):
    """The state of one hedged call: what each call answered, and who won."""

    __slots__ = (
        "call", "duplicate", "first_answer", "hedging", "nursery", "on_hedge_won", "winner",
        "wins",
    )  # fmt: skip

    def __init__(
        self,
        call: Callable[[], Awaitable[T]],
        wins: Callable[[T], bool],
        on_won: Callable[[], None],
        duplicate: Callable[[], Awaitable[T]],
    ) -> None:
        self.call = call
        self.duplicate = duplicate
        self.wins = wins
        self.on_hedge_won = on_won
        self.first_answer: tuple[T] | None = None
        self.winner: tuple[T] | None = None
        self.hedging = False
        self.nursery: trio.Nursery | None = None

    def answer(self) -> T:
        decided = self.winner or self.first_answer
        assert decided is not None  # the first call always answers unless cancelled
        return decided[0]

    def finished(self, hedge: bool, answer: T) -> None:
        if self.winner is not None:
            return  # decided: an answer in the same round, after it, changes nothing
        if not hedge:
            self.first_answer = (answer,)
        assert self.nursery is not None
        if self.wins(answer):
            self.winner = (answer,)
            if hedge:
                self.on_hedge_won()
            self.nursery.cancel_scope.cancel()
        elif hedge or not self.hedging:
            self.nursery.cancel_scope.cancel()  # nothing left to wait for

    async def first(self) -> None:
        self.finished(False, await self.call())

    async def hedge(
        self,
        hedge_at: float,
        take_slot: Callable[[], Awaitable[Slot | None]],
        release: Callable[[Slot], None],
    ) -> None:
        await trio.sleep_until(hedge_at)
        if self.first_answer is not None:
            return
        slot = await take_slot()
        if slot is None:
            return
        self.hedging = True
        try:
            with slot.guard():  # a hedge whose lease is lost is dropped
                answer = await self.duplicate()
        finally:
            release(slot)
            self.hedging = False
        if slot.lost is None and (self.first_answer is not None or self.wins(answer)):
            self.finished(True, answer)
