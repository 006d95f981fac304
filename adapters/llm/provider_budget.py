"""A provider's rate limits as one budget, shared by every agent that calls it.

72 agents against a hosted API share its requests-per-minute and tokens-per-minute
limits.  Left alone, each agent fires and retries its own 429s: a retry storm.  Here,
every HTTP attempt first takes its share of one budget per endpoint and API key
(:func:`shared_budget`), so the calls are paced instead of refused.

The budget has two lanes, requests and tokens.  Each lane paces evenly at the strictest
limit it knows (the caller's :class:`ProviderLimits`, the server's advertised
``x-ratelimit-limit-*``), less a :data:`HEADROOM` (the server counts arrivals, not our
departures, so a little slack absorbs the jitter in between; a turn taken much later than
planned, by a busy loop or a descheduled process, moves the turns after it as late).
Each lane also mirrors the server's own count when the server reports it
(``x-ratelimit-remaining-*``): the remaining budget, less what we have sent since the
reported request, refilled at the limit's rate (or as fast as ``x-ratelimit-reset-*``
says it is back).  A 429 pauses the whole endpoint until the server's reset
(``Retry-After``, else the reset headers), capped.

A server is believed only within bounds, since nothing is sent during a stall that a later
header could correct: whatever it reports, a turn comes at most ``max_pause_s`` after the
turn before it (or its reservation), unless the caller's own :class:`ProviderLimits` space
them further; a request is charged at most one minute of its lane, and a lane is never in
debt by more than one minute; an advertised limit below half of what the endpoint served
in the last minute is ignored.

Waiting is a *reservation*: :meth:`EndpointBudget.reserve` computes, under a thread lock,
the time the attempt may start ("your turn is at T"), and the caller sleeps until then on
its own event loop.  So the shared state holds no loop-bound primitive: orchestrators on
different asyncio loops (different bridges, even different threads) share one budget.
Turns are handed out in reservation order (FIFO): a later reservation never starts
before an earlier one.  The turns still waiting are a *plan* on top of what was sent:
whenever the budget learns something (a real token usage below its estimate, a
server's report, a pause, a waiter cancelled), the plan is recomputed in the same order;
a turn that moves later is found out when its waiter wakes, one that moves earlier
wakes its waiter (``call_soon_threadsafe`` on the waiter's loop).  A waiter cancelled
before its turn leaves the plan: it consumes nothing.

Time is the process's monotonic clock (``time.monotonic``), in real seconds whatever the
event loop's clock: the provider's limits are real time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import attrs
from attrs.validators import optional

from adapters.llm.ratelimit_headers import LaneHeaders, RateLimitHeaders
from kernel import InvalidRequestError
from kernel.validate import integer

__all__ = [
    "HEADROOM",
    "BudgetAccount",
    "ClusterBudget",
    "EndpointBudget",
    "LimitStats",
    "ProviderLimits",
    "SharedBudgetStore",
    "SharedBudgetUnavailableError",
    "Ticket",
    "budget_id",
    "cluster_budget",
    "shared_budget",
]

log = logging.getLogger("adapters.llm.provider_budget")

#: The share of a limit kept in reserve: lanes pace at 95 % of the limit they know.
HEADROOM = 0.05
# A turn taken later than this moves the turns after it (less is timer noise).
_LATE_S = 0.010
# A shared turn without a requests lane taken later than this moves the turns after it.
_LATE_CLUSTER_S = 0.25
# What the endpoint served counts over this long (a "minute" of its limits).
_WINDOW_S = 60.0
# An advertised limit is not believed below what was served in the last minute over
# this: a sliding minute can honestly hold up to twice a limit (a full bucket then its
# refill, or the end of one fixed window and the start of the next).
_SERVED_SLACK = 2.0


class SharedBudgetUnavailableError(Exception):
    """A shared budget's store could not be reached: the caller falls back."""


def _store(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, SharedBudgetStore):
        raise InvalidRequestError(
            f"{attribute.name} must be a shared budget store (e.g. ValkeyProviderBudget) "
            f"or None, got {type(value).__name__}"
        )


@runtime_checkable
class SharedBudgetStore(Protocol):
    """Where the budget of every replica is kept (e.g.
    :class:`adapters.valkey.ValkeyProviderBudget`): a trio object, reached from the
    asyncio orchestrators through their trio-asyncio loop.

    ``reserve`` hands out one turn (an object with ``at``, its ``time.monotonic()``, and
    ``tokens``, the charge)
    or raises :class:`SharedBudgetUnavailableError`; ``settle``, ``pause`` never block;
    ``watch`` calls its listener with the seconds a pause moved the turns later and when
    (the store's clock, as the turns' ``now_s``: when it was handed out; None: unknown);
    ``on_available`` calls its listener when the store can be reached again.
    """

    replicas: int

    @property
    def available(self) -> bool: ...

    async def reserve(
        self,
        bid: str,
        tokens: float,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        max_pause_s: float,
    ) -> Any: ...

    def settle(
        self,
        bid: str,
        *,
        requests: float = 0.0,
        tokens: float = 0.0,
        advertised_rpm: int | None = None,
        advertised_tpm: int | None = None,
        requests_wait_s: float = 0.0,
        tokens_wait_s: float = 0.0,
    ) -> None: ...

    def pause(self, bid: str, seconds: float) -> None: ...

    def watch(
        self, bid: str, listener: Callable[[float, float | None], None]
    ) -> Callable[[], None]: ...

    def on_available(self, listener: Callable[[], None]) -> Callable[[], None]: ...


@attrs.frozen
class ProviderLimits:
    """A provider's rate limits for one API key, per minute, as its dashboard shows them.

    ``None`` for either means "not given": that lane follows the server's headers only.
    Each must be an ``int`` >= 1 (not a bool, not a float), or
    :class:`~kernel.InvalidRequestError`.

    ``shared``: a :class:`SharedBudgetStore` (e.g.
    :class:`adapters.valkey.ValkeyProviderBudget`): every replica using the same store
    paces the endpoint and key together at these limits (:class:`ClusterBudget`);
    without it, the budget is this process's.
    """

    requests_per_minute: int | None = attrs.field(
        default=None, validator=optional(integer(at_least=1))
    )
    tokens_per_minute: int | None = attrs.field(
        default=None, validator=optional(integer(at_least=1))
    )
    shared: SharedBudgetStore | None = attrs.field(
        default=None, kw_only=True, validator=optional(_store), eq=False
    )


@attrs.frozen
class LimitStats:
    """What rate limiting cost one orchestrator so far.

    ``attempts``: HTTP attempts that took budget (retries included); ``waited_ms``: the
    time its agents spent waiting for budget, summed over agents and attempts (so it can
    exceed the wall time); ``responses_429``: how many answers were HTTP 429.
    """

    attempts: int = 0
    waited_ms: float = 0.0
    responses_429: int = 0


class Ticket:
    """One attempt's reservation: its turn (``at``), its token charge, and when it went."""

    __slots__ = (
        "at",
        "charged",
        "done",
        "loop",
        "reserved_at",
        "sent_at",
        "seq",
        "tokens",
        "waker",
    )

    def __init__(
        self, seq: int, tokens: float, reserved_at: float, loop: asyncio.AbstractEventLoop | None
    ) -> None:
        self.seq = seq
        self.at = reserved_at  # monotonic time of its turn (set by the plan)
        self.tokens = tokens  # its token charge: the estimate, then what it really used
        self.charged = 0.0  # what the tokens lane was charged for it when it went
        self.reserved_at = reserved_at
        self.loop = loop  # the waiter's loop, to wake it when its turn moves earlier
        self.waker: asyncio.Future[None] | None = None
        self.sent_at: float | None = None  # set when its turn came
        self.done = False  # its answer (or failure) is in

    @property
    def waited_s(self) -> float:
        """How long it waited for its turn (0 until it went)."""
        return 0.0 if self.sent_at is None else max(0.0, self.sent_at - self.reserved_at)


class _Lane:
    """One dimension of the budget (requests, or tokens), in units per second.

    Own pacing is a GCRA with no burst: a charge of ``cost`` at time ``t`` makes the next
    turn no earlier than ``t + cost / pace`` (``tat``; ``own_tat`` the same at the
    configured limit alone).  The mirror is a bucket of ``level`` units at time ``stamp``,
    refilling at ``refill`` up to ``cap``, set from the server's reports; None until the
    server reports one.  Charges are applied in non-decreasing time order (turns are
    FIFO).  No charge is more than one :attr:`minute` of the lane, and the lane is never
    in debt by more than one minute (whatever a server reports).
    """

    __slots__ = (
        "advertised",
        "cap",
        "configured",
        "level",
        "own_tat",
        "reset_rate",
        "stamp",
        "tat",
    )

    def __init__(self) -> None:
        self.configured: float | None = None  # from ProviderLimits
        self.advertised: float | None = None  # from x-ratelimit-limit-*
        self.reset_rate: float | None = None  # from remaining/reset, when no limit is known
        self.tat = -math.inf
        self.own_tat = -math.inf
        self.level: float | None = None
        self.stamp = -math.inf
        self.cap = 0.0

    @property
    def rate(self) -> float | None:
        """The strictest limit known, units per second (None: no limit known)."""
        known = [r for r in (self.configured, self.advertised) if r is not None]
        return min(known) if known else None

    @property
    def pace(self) -> float | None:
        rate = self.rate
        return None if rate is None else rate * (1.0 - HEADROOM)

    @property
    def refill(self) -> float | None:
        """How fast the server's budget comes back: its limit, else ours, else the
        estimate from its reset header."""
        return self.advertised or self.configured or self.reset_rate

    @property
    def minute(self) -> float:
        """One minute of the lane, in units: the most one request can cost (a server
        refuses a request larger than its per-minute limit) and the deepest debt the lane
        may be in.  Infinite while nothing says how fast the lane goes."""
        rate = self.rate or self.refill
        return math.inf if rate is None else rate * 60.0

    def cost(self, units: float) -> float:
        """What a request of ``units`` is charged: at most one minute of the lane."""
        return min(units, self.minute)

    def debt(self, now: float) -> float:
        """How far the lane is in debt at ``now``, in units (0 if not)."""
        owed = 0.0
        pace = self.pace
        if pace is not None and self.tat > now:
            owed = (self.tat - now) * pace
        if self.level is not None and self.level < 0:
            owed = max(owed, -self.level)
        return owed

    def _level_at(self, t: float) -> float:
        assert self.level is not None
        refill = self.refill or 0.0
        return min(max(self.cap, self.level), self.level + refill * max(0.0, t - self.stamp))

    def ready(self, t: float, cost: float) -> float:
        """The earliest time >= ``t`` at which ``cost`` may go."""
        cost = self.cost(cost)
        pace = self.pace
        if pace is not None:
            t = max(t, self.tat)
        refill = self.refill
        if self.level is not None and refill:
            t = max(t, self.stamp)
            need = min(cost, self.cap)  # more than the server ever holds: wait for a full one
            have = self._level_at(t)
            if have < need:
                t += (need - have) / refill
        return t

    def ready_own(self, t: float, cost: float) -> float:
        """The earliest time >= ``t`` at which the configured limit alone lets ``cost``
        go (``t`` if there is none)."""
        if self.configured is None:
            return t
        return max(t, self.own_tat)

    def charge(self, t: float, cost: float) -> None:
        cost = self.cost(cost)
        pace = self.pace
        if pace is not None:
            # At most a minute ahead of the charge: a debt beyond that is forgiven.
            self.tat = min(max(self.tat, t) + cost / pace, t + self.minute / pace)
        if self.configured is not None:
            own = self.configured * (1.0 - HEADROOM)
            mine = min(cost, self.configured * 60.0)
            self.own_tat = min(max(self.own_tat, t) + mine / own, t + 60.0 / (1.0 - HEADROOM))
        if self.level is not None:
            t = max(t, self.stamp)
            self.level = self._bounded(self._level_at(t) - cost)
            self.stamp = t

    def _bounded(self, level: float) -> float:
        """``level``, at most a minute of debt (and a finite number)."""
        return max(level, -self.minute) if math.isfinite(level) else -self.minute

    def rebound(self) -> None:
        """Keep the mirror's debt within a minute after the lane's limit changed."""
        if self.level is not None:
            self.level = self._bounded(self.level)

    def copy(self) -> _Lane:
        lane = _Lane()
        for name in self.__slots__:
            setattr(lane, name, getattr(self, name))
        return lane

    def refund(self, amount: float, now: float) -> None:
        """Give back ``amount`` (negative: charge more), e.g. a cancelled reservation or
        the difference between a token estimate and the real usage.  A charge more never
        puts the lane in debt by more than a minute from ``now``."""
        pace = self.pace
        if pace is not None and math.isfinite(self.tat):
            moved = self.tat - amount / pace
            self.tat = min(moved, max(self.tat, now + self.minute / pace))
        if self.configured is not None and math.isfinite(self.own_tat):
            own = self.configured * (1.0 - HEADROOM)
            moved = self.own_tat - amount / own
            self.own_tat = min(moved, max(self.own_tat, now + 60.0 / (1.0 - HEADROOM)))
        if self.level is not None:
            level = min(max(self.cap, self.level), self.level + amount)
            self.level = min(self.level, self._bounded(level)) if amount < 0 else level

    def sync(
        self,
        report: LaneHeaders,
        now: float,
        sent_at: float,
        own: float,
        after: float,
        max_reset_s: float,
    ) -> None:
        """Follow a response's report: its limit, and its remaining count.

        ``sent_at``: when the reported request went; ``own``: its charge; ``after``: what
        was sent since it went, which the server's ``remaining`` cannot include yet.
        ``max_reset_s``: a reset longer than this is taken as this long (a server that
        says "back in 30 years" must not stall the endpoint longer than a 429 could).
        The caller has already dropped a limit not to be believed.
        """
        if report.limit_per_minute is not None:
            self.advertised = report.limit_per_minute / 60.0
            self.rebound()
        if report.remaining is None:
            return
        self.cap = max(self.cap, report.remaining + own)
        reset_s = min(report.reset_s or 0.0, max_reset_s)
        if reset_s:
            # Back to full within reset_s: at least this fast.
            self.reset_rate = max(self.cap - report.remaining, 1.0) / reset_s
        refill = self.refill
        if not refill:
            return  # nothing says how it refills: mirroring it would stall
        # The server's remaining when it answered (about when the request arrived),
        # refilled since, less everything we sent after it.
        level = min(self.cap, report.remaining + refill * max(0.0, now - sent_at)) - after
        stamp = now if self.level is None else max(self.stamp, now)
        self.level = self._bounded(min(self.cap, level + refill * (stamp - now)))
        self.stamp = stamp


class _ServedWindow:
    """What an endpoint served in the last minute: its requests and their tokens, the
    sum kept as they come and go (each response reads it: a sum over the window each time
    cost O(requests a minute) per response)."""

    __slots__ = ("_entries", "tokens")

    def __init__(self) -> None:
        self._entries: collections.deque[tuple[float, float]] = collections.deque()
        self.tokens = 0.0

    @property
    def requests(self) -> int:
        return len(self._entries)

    def append(self, at: float, tokens: float) -> None:
        self._entries.append((at, tokens))
        self.tokens += tokens

    def expire(self, before: float) -> None:
        """Forget what was served at ``before`` or earlier."""
        entries = self._entries
        while entries and entries[0][0] <= before:
            self.tokens -= entries.popleft()[1]
        if not entries:
            self.tokens = 0.0  # no float drift left over once the window is empty


class EndpointBudget:
    """The budget of one endpoint and key; thread-safe, usable from any event loop.

    Use :meth:`acquire` before each HTTP attempt and :meth:`finish` after it.  The lanes
    take the strictest :class:`ProviderLimits` any user configured (:meth:`configure`).
    ``name`` (the endpoint's URL) is for logs; ``clock`` is for tests.
    """

    def __init__(self, name: str = "", *, clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._clock = clock
        self._lock = threading.Lock()
        # What was sent (committed); the plan for the pending turns builds on top of it.
        self.requests = _Lane()
        self.tokens = _Lane()
        self._pending: list[Ticket] = []  # reserved, turn not yet come, in FIFO order
        self._sent: collections.deque[Ticket] = collections.deque()  # for replaying reports
        self._seq = 0
        self._paused_until = -math.inf
        self._last_turn = -math.inf  # the latest turn that went
        # The longest any caller lets one report hold a turn back (finish's max_pause_s).
        self._max_pause_s = math.inf
        # (when, tokens) of each answer that was not a 429, over the last minute.
        self._served = _ServedWindow()
        self._doubted: set[str] = set()  # lanes whose advertised limit was not believed
        # The lanes and the last turn once every pending turn is charged (the plan's end).
        self._plan: tuple[_Lane, _Lane, float] = (self.requests, self.tokens, -math.inf)

    def __repr__(self) -> str:
        return (
            f"<EndpointBudget {self.name or '-'} rpm={_per_min(self.requests.rate)} "
            f"tpm={_per_min(self.tokens.rate)} pending={len(self._pending)}>"
        )

    # ------------------------------------------------------------ read side

    @property
    def paused_until(self) -> float:
        """Monotonic time until which the endpoint is paused (a 429); -inf if never."""
        return self._paused_until

    @property
    def pending(self) -> int:
        """Reservations waiting for their turn now."""
        return len(self._pending)

    def turns(self) -> list[float]:
        """The planned turns of the pending reservations, in order."""
        with self._lock:
            return [ticket.at for ticket in self._pending]

    def next_turn(self, tokens: float = 0.0) -> float:
        """The turn a reservation made now would get, without making it."""
        with self._lock:
            requests, tokens_lane, last = self._plan
            now = self._clock()
            return self._turn(requests.copy(), tokens_lane.copy(), last, tokens, now, now)

    # ------------------------------------------------------------ configuration

    def configure(self, limits: ProviderLimits | None) -> None:
        """Apply ``limits``; a lane keeps the strictest limit it was ever given."""
        if limits is None:
            return
        with self._lock:
            for lane, per_minute in (
                (self.requests, limits.requests_per_minute),
                (self.tokens, limits.tokens_per_minute),
            ):
                if per_minute is not None:
                    rate = per_minute / 60.0
                    known = lane.configured
                    lane.configured = rate if known is None else min(known, rate)
                    lane.rebound()
            self._replan()

    # ------------------------------------------------------------ planning

    def _turn(
        self,
        requests: _Lane,
        tokens_lane: _Lane,
        last: float,
        tokens: float,
        now: float,
        reserved_at: float,
    ) -> float:
        """Plan one turn after ``last`` on these lanes, and charge them for it."""
        start = max(now, self._paused_until, last)  # FIFO: never before an earlier turn
        t = requests.ready(start, 1.0)
        # Each lane's ready() is monotone, so one pass finds a time both accept.
        t = tokens_lane.ready(t, tokens)
        # What the server said (its limits, its counts, the usage it reported) holds a
        # turn back at most max_pause_s after the turn before it (or its reservation):
        # a lie must not stall the endpoint, and nothing is sent during a stall that
        # could correct it.  The caller's own limits are believed in full.
        own = max(requests.ready_own(start, 1.0), tokens_lane.ready_own(start, tokens))
        latest = max(own, max(reserved_at, last) + self._max_pause_s)
        t = max(start, min(t, latest))
        requests.charge(t, 1.0)
        tokens_lane.charge(t, tokens)
        return t

    def _replan(self) -> None:
        """Recompute every pending turn, in order, on top of what was sent; wake the
        waiters whose turn moved earlier."""
        now = self._clock()
        requests, tokens_lane = self.requests.copy(), self.tokens.copy()
        last = self._last_turn
        for ticket in self._pending:
            at = self._turn(requests, tokens_lane, last, ticket.tokens, now, ticket.reserved_at)
            if at < ticket.at:
                _wake(ticket)
            ticket.at = last = at
        self._plan = (requests, tokens_lane, last)

    # ------------------------------------------------------------ reserving

    def reserve(self, tokens: float, loop: asyncio.AbstractEventLoop | None = None) -> Ticket:
        """Take the next turn for one request of ``tokens`` estimated tokens."""
        with self._lock:
            now = self._clock()
            self._seq += 1
            ticket = Ticket(self._seq, tokens, now, loop)
            requests, tokens_lane, last = self._plan
            if not self._pending:  # the plan is what was sent: charge copies, not it
                requests, tokens_lane = requests.copy(), tokens_lane.copy()
            ticket.at = self._turn(requests, tokens_lane, last, tokens, now, now)
            self._plan = (requests, tokens_lane, ticket.at)
            self._pending.append(ticket)
            return ticket

    def try_send(self, ticket: Ticket) -> float:
        """0 and the ticket sent if its turn has come, else seconds to wait (and a
        fresh ``waker`` to wait on)."""
        with self._lock:
            now = self._clock()
            if ticket.at > now:
                if ticket.loop is not None:
                    ticket.waker = ticket.loop.create_future()
                return ticket.at - now
            self._pending.remove(ticket)
            ticket.sent_at = now
            ticket.waker = None
            # Commit its charges at its turn, or when it really went if that was much
            # later (its loop was busy, the process descheduled): then the turns after
            # it move as late, since the server counts arrivals, and a late call followed
            # by on-time ones would crowd the server's window.  A little late is timer
            # noise, which the headroom absorbs; moving the plan for it would only lose
            # throughput.
            late = now - ticket.at > _LATE_S
            went = now if late else ticket.at
            self.requests.charge(went, 1.0)
            ticket.charged = self.tokens.cost(ticket.tokens)
            self.tokens.charge(went, ticket.tokens)
            self._last_turn = max(self._last_turn, went)
            self._sent.append(ticket)
            if not self._pending:
                self._plan = (self.requests, self.tokens, self._last_turn)
            elif late:
                self._replan()
            return 0.0

    def cancel(self, ticket: Ticket) -> None:
        """Give a pending reservation back (it consumes nothing); no-op once it went."""
        with self._lock:
            if ticket.sent_at is not None or ticket not in self._pending:
                return
            self._pending.remove(ticket)
            ticket.waker = None
            self._replan()

    async def acquire(self, tokens: float) -> Ticket:
        """Wait (asyncio, on the running loop) for a turn; return the sent ticket.

        Cancelled while waiting, the reservation is given back and the cancellation
        propagates at once.
        """
        ticket = self.reserve(tokens, asyncio.get_running_loop())
        try:
            while (delay := self.try_send(ticket)) > 0:
                # Wakes at the turn, or earlier if the plan moves it earlier; a turn
                # moved later is found out here, and slept on again.
                waker = ticket.waker
                assert waker is not None
                await asyncio.wait((waker,), timeout=delay)
        except BaseException:
            self.cancel(ticket)
            raise
        return ticket

    # ------------------------------------------------------------ answers

    def finish(
        self,
        ticket: Ticket,
        report: RateLimitHeaders | None,
        *,
        used_tokens: float | None = None,
        throttled: bool = False,
        max_pause_s: float,
    ) -> float | None:
        """Record a sent attempt's outcome: settle its tokens with ``used_tokens`` (the
        real usage, when known), follow ``report`` (the response's headers; None when
        there was no response), and on a 429 (``throttled``) pause the endpoint for the
        reset it gives, at most ``max_pause_s``.

        Returns the pause applied for a 429, or None if the response gave no reset (the
        caller then decides; see :meth:`pause`).  Idempotent per ticket.
        """
        with self._lock:
            if ticket.done or ticket.sent_at is None:
                return None
            ticket.done = True
            now = self._clock()
            self._max_pause_s = min(self._max_pause_s, max_pause_s)
            changed = False
            served = 0.0  # the tokens it is known to have been served
            if used_tokens is not None and math.isfinite(used_tokens) and used_tokens >= 0:
                # A usage above one minute of the lane (or, with no limit known, above
                # the estimate) is a lie: a server refuses a request that large.
                if self.tokens.rate is None:
                    used_tokens = min(used_tokens, ticket.tokens)
                used_tokens = self.tokens.cost(used_tokens)
                self.tokens.refund(ticket.charged - used_tokens, now)
                changed = used_tokens != ticket.tokens
                ticket.tokens = ticket.charged = served = used_tokens
            if report is not None and not throttled:
                self._served.append(now, served)
            self._served.expire(now - _WINDOW_S)
            pause = None
            doubted_before = self.requests.advertised, self.tokens.advertised
            report = self._believable(report)
            changed = changed or doubted_before != (
                self.requests.advertised,
                self.tokens.advertised,
            )
            if report is not None and report.present:
                after_requests, after_tokens = self._sent_after(ticket)
                sent = ticket.sent_at
                self.requests.sync(report.requests, now, sent, 1.0, after_requests, max_pause_s)
                self.tokens.sync(report.tokens, now, sent, ticket.tokens, after_tokens, max_pause_s)
                changed = True
                if throttled:
                    pause = report.reset_after_429_s()
                    if pause is not None:
                        pause = min(pause, max_pause_s)
                        self._paused_until = max(self._paused_until, now + pause)
            while self._sent and self._sent[0].done:
                self._sent.popleft()
            if changed:
                self._replan()
        if pause is not None and pause > 0:
            self._log_pause(pause)
        return pause

    def _believable(self, report: RateLimitHeaders | None) -> RateLimitHeaders | None:
        """``report`` without an advertised limit far below what the endpoint served in
        the last minute (a server that says "1 token a minute" after serving thousands is
        not believed); logged once per lane.  A limit believed from an earlier report
        (before enough was served to doubt it) is dropped by the same rule, whether or
        not this report repeats it: else one early lie would pace the lane for good."""
        served_requests = float(self._served.requests)
        served_tokens = self._served.tokens
        reported = {
            "requests": None if report is None else report.requests,
            "tokens": None if report is None else report.tokens,
        }
        for name, lane, served in (
            ("requests", self.requests, served_requests),
            ("tokens", self.tokens, served_tokens),
        ):
            said = reported[name]
            limit = None if said is None else said.limit_per_minute
            doubted = limit is not None and limit * _SERVED_SLACK < served
            if doubted:
                assert said is not None
                reported[name] = attrs.evolve(said, limit_per_minute=None)
            if lane.advertised is not None and lane.advertised * 60.0 * _SERVED_SLACK < served:
                limit = lane.advertised * 60.0 if limit is None else limit
                lane.advertised = None
                # The pacing it caused goes too (the caller's own limit keeps its own).
                lane.tat = lane.own_tat
                lane.rebound()
                doubted = True
            if doubted and name not in self._doubted:
                self._doubted.add(name)
                log.warning(
                    "advertised rate limit not believed: below what the endpoint served",
                    extra={
                        "base_url": self.name,
                        "lane": name,
                        "limit_per_minute": limit,
                        "served_last_minute": served,
                    },
                )
        if report is None:
            return None
        requests, tokens = reported["requests"], reported["tokens"]
        assert requests is not None and tokens is not None
        return attrs.evolve(report, requests=requests, tokens=tokens)

    def pause(self, seconds: float) -> None:
        """Pause the whole endpoint for ``seconds`` from now (a 429 that said nothing of
        when to come back: the caller's backoff)."""
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))
            self._replan()
        self._log_pause(seconds)

    def _log_pause(self, seconds: float) -> None:
        log.info(
            "endpoint paused after HTTP 429",
            extra={"base_url": self.name, "pause_s": round(seconds, 3), "waiting": self.pending},
        )

    def _sent_after(self, ticket: Ticket) -> tuple[float, float]:
        """Requests and tokens sent after ``ticket``."""
        requests = tokens = 0.0
        for later in reversed(self._sent):
            if later.seq <= ticket.seq:
                break
            requests += 1.0
            tokens += later.tokens
        return requests, tokens


def _wake(ticket: Ticket) -> None:
    """Wake the waiter of ``ticket`` (on its own loop, from any thread)."""
    waker, ticket.waker = ticket.waker, None
    if waker is None or ticket.loop is None:
        return
    with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
        ticket.loop.call_soon_threadsafe(_resolve, waker)


def _resolve(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)


def _per_min(rate: float | None) -> str:
    return "-" if rate is None else f"{rate * 60:g}"


# ---------------------------------------------------------------- the registry

_registry: weakref.WeakValueDictionary[tuple[str, str], EndpointBudget] = (
    weakref.WeakValueDictionary()
)
_registry_lock = threading.Lock()
# Keys are told apart by an HMAC under a per-process secret: the registry holds no key,
# nor anything that could be checked against a guessed one outside this process.
_SALT = secrets.token_bytes(32)


def shared_budget(base_url: str, api_key: str) -> EndpointBudget:
    """The one budget of ``base_url`` and ``api_key`` in this process.

    Every orchestrator that calls the same endpoint with the same key gets the same
    budget, whatever its event loop or thread; a different key (or endpoint) gets
    another.  A budget lives as long as someone holds it.
    """
    fingerprint = hmac.new(
        _SALT, api_key.encode("utf-8", "surrogatepass"), hashlib.sha256
    ).hexdigest()
    key = (base_url.rstrip("/"), fingerprint)
    with _registry_lock:
        budget = _registry.get(key)
        if budget is None:
            budget = EndpointBudget(key[0])
            _registry[key] = budget
        return budget


# ---------------------------------------------------------------- across replicas


def budget_id(base_url: str, api_key: str) -> str:
    """The name every replica gives the budget of ``base_url`` and ``api_key`` in a shared
    store: a hash of both (the key itself never leaves the process)."""
    material = f"conclave.budget/1\0{base_url.rstrip('/')}\0{api_key}"
    return hashlib.sha256(material.encode("utf-8", "surrogatepass")).hexdigest()[:32]


class _SharedTicket(Ticket):
    """A turn handed out by the shared store (not by the local fallback)."""

    __slots__ = ()


class ClusterBudget:
    """The budget of one endpoint and key, shared with every replica through a
    :class:`SharedBudgetStore`; the same calls as :class:`EndpointBudget`.

    Each attempt takes its turn from the store (one call), then waits for it on its own
    loop; a pause another replica reports moves the turns still waiting later.  While the
    store is unreachable, turns come from a local :class:`EndpointBudget` at
    ``1 / replicas`` of the limits: never unlimited.  Runs on a trio-asyncio loop (the
    store is trio's).
    """

    def __init__(self, name: str, bid: str, store: SharedBudgetStore) -> None:
        self.name = name
        self._bid = bid
        self._store = store
        self._lock = threading.Lock()
        self._requests: int | None = None
        self._tokens: int | None = None
        self._max_pause_s = 30.0
        self._seq = 0
        self._waiting: set[Ticket] = set()
        # Recent pauses (when, on the store's clock; how far; when heard, on ours): a turn
        # handed out before one but heard of after it (the reply and the event come apart)
        # moves too.
        self._shifts: collections.deque[tuple[float, float, float]] = collections.deque(maxlen=64)
        self.fallback = EndpointBudget(name)
        # Fallback waiters, woken (on their loops) when the store is back.
        self._back: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()
        self._unwatch = store.watch(bid, self._shift)
        self._unback = store.on_available(self._store_back)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._unwatch()
            self._unback()

    def _store_back(self) -> None:
        with self._lock:
            back, self._back = self._back, set()
        for loop, future in back:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                loop.call_soon_threadsafe(_resolve, future)

    def configure(self, limits: ProviderLimits | None) -> None:
        """Apply ``limits`` (a lane keeps the strictest it was given); the fallback takes
        this replica's share of them."""
        if limits is None:
            return
        with self._lock:
            if limits.requests_per_minute is not None:
                self._requests = _stricter(self._requests, limits.requests_per_minute)
            if limits.tokens_per_minute is not None:
                self._tokens = _stricter(self._tokens, limits.tokens_per_minute)
        replicas = self._store.replicas
        self.fallback.configure(
            ProviderLimits(
                requests_per_minute=None
                if self._requests is None
                else max(1, self._requests // replicas),
                tokens_per_minute=None
                if self._tokens is None
                else max(1, self._tokens // replicas),
            )
        )

    def _shift(self, seconds: float, at: float | None = None) -> None:
        with self._lock:
            for ticket in self._waiting:
                ticket.at += seconds
            if at is not None:
                self._shifts.append((at, seconds, time.monotonic()))

    async def acquire(self, tokens: float) -> Ticket:
        """Wait for a turn; cancelled while waiting, it is given back."""
        store = self._store
        if store.available:
            import trio_asyncio

            if trio_asyncio.current_loop.get() is None:  # plain asyncio: no trio to call
                raise RuntimeError(
                    "a shared provider budget needs its orchestrator run under trio "
                    "(AsyncioOrchestratorBridge): its store is a trio object"
                )
            reserve = trio_asyncio.trio_as_aio(store.reserve)
            reserved_at = time.monotonic()
            try:
                grant = await reserve(
                    self._bid, tokens, self._requests, self._tokens, self._max_pause_s
                )
            except SharedBudgetUnavailableError:
                pass  # the store logs it, once: this replica paces at its share
            else:
                return await self._wait(grant, reserved_at)
        return await self._fall_back(tokens)

    async def _fall_back(self, tokens: float) -> Ticket:
        """A turn of this replica's share; if the store is back before it comes, the
        turn is given back and taken from the store instead (sharing resumes for the
        agents already waiting, not only for the next ones)."""
        loop = asyncio.get_running_loop()
        back: asyncio.Future[None] = loop.create_future()
        entry = (loop, back)
        with self._lock:
            self._back.add(entry)
        turn = asyncio.ensure_future(self.fallback.acquire(tokens))
        try:
            await asyncio.wait((turn, back), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            turn.cancel()  # its reservation is given back
            raise
        finally:
            with self._lock:
                self._back.discard(entry)
        if not turn.done():
            turn.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await turn
        if not turn.cancelled():
            return turn.result()
        return await self.acquire(tokens)

    async def _wait(self, grant: Any, reserved_at: float) -> Ticket:
        with self._lock:
            self._seq += 1
            ticket = _SharedTicket(self._seq, float(grant.tokens), reserved_at, None)
            handed_out = getattr(grant, "now_s", None)
            ticket.at = float(grant.at)
            if handed_out is not None:
                # Only pauses heard since it was asked for: one heard earlier was in place
                # before (and a server clock stepped back makes old ones look later).
                ticket.at += sum(
                    s for at, s, heard in self._shifts if heard >= reserved_at and at > handed_out
                )
            ticket.charged = ticket.tokens
            self._waiting.add(ticket)
        try:
            # A pause heard meanwhile moves ticket.at later: slept on again.
            delay = ticket.at - time.monotonic()
            while delay > 0:
                await asyncio.sleep(delay)
                delay = ticket.at - time.monotonic()
        except BaseException:
            self._store.settle(self._bid, requests=1.0, tokens=ticket.charged)
            raise
        finally:
            with self._lock:
                self._waiting.discard(ticket)
        ticket.sent_at = now = time.monotonic()
        late = now - ticket.at
        tolerated = self._late_s(grant)
        if late > tolerated:
            # Sent late (a descheduled process): the turns after it move as late, less
            # what the headroom absorbs, cluster-wide (the server counts arrivals).
            self._store.pause(self._bid, late - tolerated)
        return ticket

    @staticmethod
    def _late_s(grant: Any) -> float:
        """How late a turn may go before the turns after it move: four turns of the
        requests lane.  A late turn crowds a window by one request at most, whatever
        its lateness, and the headroom absorbs a few (6 of a limit of 120); moving the
        whole cluster at 10 ms of lateness, for every loaded replica's jitter, took
        7.5 s against 6.9 s for 3 x 72 calls (three replicas, a loaded 2-core machine)."""
        rpm = grant.requests_per_minute
        if not rpm:
            return _LATE_CLUSTER_S
        return max(_LATE_S, 4.0 * 60.0 / (float(rpm) * (1.0 - HEADROOM)))

    def finish(
        self,
        ticket: Ticket,
        report: RateLimitHeaders | None,
        *,
        used_tokens: float | None = None,
        throttled: bool = False,
        max_pause_s: float,
    ) -> float | None:
        """As :meth:`EndpointBudget.finish`: settle the usage, pass on what the headers
        said, pause the whole cluster on a 429.  Never blocks."""
        if not isinstance(ticket, _SharedTicket):
            return self.fallback.finish(
                ticket, report, used_tokens=used_tokens, throttled=throttled,
                max_pause_s=max_pause_s,
            )  # fmt: skip
        if ticket.done:
            return None
        ticket.done = True
        self._max_pause_s = min(self._max_pause_s, max_pause_s)
        given_back = 0.0
        if used_tokens is not None and math.isfinite(used_tokens) and used_tokens >= 0:
            given_back = ticket.charged - used_tokens
        learned: dict[str, Any] = {}
        if report is not None and report.present:
            for lane, said in (("requests", report.requests), ("tokens", report.tokens)):
                if said.limit_per_minute is not None:
                    learned[f"advertised_{lane[0]}pm"] = int(said.limit_per_minute)
                if said.remaining is not None and said.remaining <= 0 and said.reset_s:
                    learned[f"{lane}_wait_s"] = min(said.reset_s, max_pause_s)
        if given_back or learned:
            self._store.settle(self._bid, tokens=given_back, **learned)
        pause = None
        if throttled and report is not None:
            pause = report.reset_after_429_s()
            if pause is not None:
                pause = min(pause, max_pause_s)
                self._store.pause(self._bid, pause)
                log.info(
                    "endpoint paused after HTTP 429, cluster-wide",
                    extra={"base_url": self.name, "pause_s": round(pause, 3)},
                )
        return pause

    def pause(self, seconds: float) -> None:
        """Pause the endpoint cluster-wide for ``seconds`` (a 429 without a reset)."""
        if self._store.available:
            self._store.pause(self._bid, seconds)
        else:
            self.fallback.pause(seconds)


def _stricter(known: int | None, given: int) -> int:
    return given if known is None else min(known, given)


_clusters: weakref.WeakValueDictionary[tuple[int, str, str], ClusterBudget] = (
    weakref.WeakValueDictionary()
)


def cluster_budget(base_url: str, api_key: str, store: SharedBudgetStore) -> ClusterBudget:
    """The one :class:`ClusterBudget` of ``base_url`` and ``api_key`` on ``store`` in this
    process (every orchestrator gets the same, so a pause moves all its waiters)."""
    url = base_url.rstrip("/")
    bid = budget_id(url, api_key)
    key = (id(store), url, bid)
    with _registry_lock:
        budget = _clusters.get(key)
        if budget is None or budget._store is not store:
            budget = ClusterBudget(url, bid, store)
            _clusters[key] = budget
        return budget


class BudgetAccount:
    """One orchestrator's side of the budgets it draws on: the budget of each endpoint it
    calls (the process's one for that endpoint and key, :func:`shared_budget`, given this
    orchestrator's ``limits``) and what rate limiting has cost its agents
    (:class:`LimitStats`).  Thread-safe: an orchestrator sets up in a worker thread."""

    def __init__(self, api_key: str, limits: ProviderLimits | None) -> None:
        self._api_key = api_key
        self.limits = limits
        self._budgets: dict[str, EndpointBudget | ClusterBudget] = {}
        self._lock = threading.Lock()
        self._stats = LimitStats()

    def budget(self, base_url: str) -> EndpointBudget | ClusterBudget:
        """The budget of ``base_url`` (and this account's key): the process's, or with
        ``limits.shared`` the one every replica on that store shares."""
        budget = self._budgets.get(base_url)
        if budget is None:
            with self._lock:
                budget = self._budgets.get(base_url)
                if budget is None:
                    store = None if self.limits is None else self.limits.shared
                    if store is not None:  # one budget across every replica
                        budget = cluster_budget(base_url, self._api_key, store)
                    else:
                        budget = shared_budget(base_url, self._api_key)
                    budget.configure(self.limits)
                    self._budgets[base_url] = budget
        return budget

    def stats(self) -> LimitStats:
        """What rate limiting has cost this account's agents so far."""
        with self._lock:
            return self._stats

    def count(self, *, waited_s: float = 0.0, throttled: bool = False) -> None:
        """One attempt that took budget (and waited ``waited_s`` for it), or one 429."""
        with self._lock:
            s = self._stats
            self._stats = LimitStats(
                attempts=s.attempts + (0 if throttled else 1),
                waited_ms=s.waited_ms + waited_s * 1000.0,
                responses_429=s.responses_429 + (1 if throttled else 0),
            )
