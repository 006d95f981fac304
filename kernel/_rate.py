"""A trio-native rate limit: a token bucket with a fair (FIFO) queue of waiters."""

from __future__ import annotations

import collections

import attrs
import trio

from kernel.validate import check_int, check_number

__all__ = ["RateLimit", "RateLimitStatistics"]


class _Waiter:
    __slots__ = ("cost", "turn")

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.turn = trio.Event()  # set when this waiter reaches the head of the queue


@attrs.frozen(slots=True)
class RateLimitStatistics:
    """A :class:`RateLimit` at one instant (:meth:`RateLimit.statistics`).

    Attributes:
        per_second: the refill rate, tokens a second.
        burst: the bucket's size, in tokens.
        tokens: the tokens in the bucket now (refilled to this instant inside a trio run;
            negative while a cost above the burst is being paid off).
        tasks_waiting: tasks queued for tokens now.
    """

    per_second: float
    burst: int
    tokens: float
    tasks_waiting: int


class RateLimit:
    """At most ``per_second`` units per second on average, in bursts of at most ``burst``.

    A token bucket that holds ``burst`` tokens and refills at ``per_second`` tokens a
    second; it starts full.  :meth:`acquire` takes ``cost`` tokens, waiting until they are
    there.  The bucket is shared by every task that holds it.

    * **Fair**: waiters are served in the order they arrived; a cheap request never
      overtakes an expensive one that came first.
    * **Cancellable**: a waiter cancelled while waiting takes nothing and leaves the queue;
      the next one moves up.
    * **Even**: with ``burst=1``, calls are spaced exactly ``1 / per_second`` apart.
    * A ``cost`` larger than ``burst`` is allowed: it waits for a full bucket and leaves it
      in debt, so the calls after it wait longer.

    Trio only (no thread, no asyncio); use it from the trio thread that runs the kernel.
    ``per_second`` must be a finite number > 0, ``burst`` an int >= 1, ``cost`` > 0, or
    :class:`~kernel.InvalidRequestError`.
    """

    def __init__(self, per_second: float, *, burst: int = 1) -> None:
        self._rate = check_number(per_second, "per_second", above=0)
        self._burst = float(check_int(burst, "burst", at_least=1))
        self._tokens = self._burst
        self._stamp: float | None = None  # trio time of the last refill (set on first use)
        self._run: object = None  # the trio run that stamp belongs to
        self._queue: collections.deque[_Waiter] = collections.deque()

    def __repr__(self) -> str:
        return f"<RateLimit {self._rate:g}/s burst={self._burst:g} waiting={len(self._queue)}>"

    def statistics(self) -> RateLimitStatistics:
        """The bucket now, in one frozen snapshot (changes nothing, no checkpoint)."""
        return RateLimitStatistics(
            per_second=self._rate,
            burst=int(self._burst),
            tokens=self._tokens_now(),
            tasks_waiting=len(self._queue),
        )

    def _tokens_now(self) -> float:
        """The tokens there would be after a refill now, without refilling."""
        try:
            now, run = trio.current_time(), trio.lowlevel.current_trio_token()
        except RuntimeError:  # outside trio: as of the last refill
            return self._tokens
        if self._stamp is None or run is not self._run:
            return self._tokens
        return min(self._burst, self._tokens + max(0.0, now - self._stamp) * self._rate)

    @property
    def per_second(self) -> float:
        return self._rate

    @property
    def burst(self) -> int:
        return int(self._burst)

    @property
    def waiting(self) -> int:
        """How many tasks are waiting for tokens now."""
        return len(self._queue)

    def _refill(self) -> None:
        now = trio.current_time()
        run = trio.lowlevel.current_trio_token()
        if run is not self._run:
            # Another trio.run: its clock has its own offset, so the old stamp means
            # nothing here.  Keep the tokens, start counting again (no credit for the gap).
            self._run, self._stamp = run, None
        if self._stamp is not None:
            self._tokens = min(self._burst, self._tokens + max(0.0, now - self._stamp) * self._rate)
        self._stamp = now

    def _seconds_until(self, cost: float) -> float:
        """How long until ``cost`` tokens can be taken (a cost above the burst needs a full
        bucket, and then goes into debt)."""
        self._refill()
        return max(0.0, (min(cost, self._burst) - self._tokens) / self._rate)

    async def acquire(self, cost: float = 1.0) -> None:
        """Take ``cost`` tokens, waiting (FIFO) until they are available.

        Always a checkpoint.  Cancelled while waiting, it takes nothing.
        """
        cost = check_number(cost, "cost", above=0)
        waiter = _Waiter(cost)
        self._queue.append(waiter)
        if self._queue[0] is waiter:
            waiter.turn.set()
        try:
            await waiter.turn.wait()  # a checkpoint, even when it is already our turn
            # Nobody else takes tokens while we are at the head: one sleep is enough.
            wait = self._seconds_until(cost)
            if wait > 0:
                await trio.sleep(wait)
                self._refill()
            self._tokens -= cost
        finally:
            # Served or cancelled, this waiter leaves; the next one, if any, moves up.
            was_head = self._queue[0] is waiter
            self._queue.remove(waiter)
            if was_head and self._queue:
                self._queue[0].turn.set()
