"""One provider budget for every replica: the rpm and tpm lanes held on a Valkey server.

``ProviderLimits(requests_per_minute=R, shared=ValkeyProviderBudget(url, replicas=3))``
makes every replica that uses the same server and ``key_prefix`` pace one endpoint and
API key together at R a minute, instead of each at R (a 429 storm at N x R).  The lanes
are a GCRA held server-side (:mod:`adapters.valkey._budget_lua`): each HTTP attempt
costs **one** call, which hands it a turn ("start in 37 ms"), in arrival order across the
replicas; the attempt then waits for it locally.  What the replica has to tell the
others (its reported token usage, the limits and counts of the ``x-ratelimit-*``
headers, a cancelled turn given back) is folded into its next call, or sent by a
background task within :data:`SETTLE_DELAY_S` if no call comes.  A 429 pause is sent at
once and published: every replica moves its waiting turns later as soon as it hears.

The budget of an endpoint and key is known by a hash of both (``sha256``; the key never
leaves the process, not even to the server).

The server unreachable (down, killed, too slow: every call is bounded by ``timeout``):
the calling replica falls back to its local budget at ``1 / replicas`` of the limits
(never unlimited), logs it once, and a background probe retries every
:data:`PROBE_EVERY_S`; when the server answers again, sharing resumes (logged once).  A
halt never waits on the server: every call is cancellable, and a waiting turn is plain
local time.

Use it from trio (``async with``); the asyncio orchestrators reach it through their
trio-asyncio loop (:class:`~adapters.llm.provider_budget.ClusterBudget`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any

import attrs
import trio

from adapters.llm.provider_budget import SharedBudgetUnavailableError
from adapters.urls import redact_url
from adapters.valkey._budget_lua import BUDGET
from adapters.valkey._capacity import read_counts
from adapters.valkey._connection import (
    BackgroundClient,
    Client,
    StoreError,
    backoff,
    check_name,
    check_timeout,
    check_url,
    describe,
    reraise_cancellation,
    store_call,
    to_int,
)
from kernel.validate import check_int

__all__ = ["BudgetGrant", "BudgetLanes", "ValkeyProviderBudget"]

log = logging.getLogger("adapters.valkey")

#: How long a settlement waits to be folded into a call before it is sent on its own.
SETTLE_DELAY_S = 0.1
#: How often an unreachable server is tried again.
PROBE_EVERY_S = 0.5
# How long the server clock's best reading stays the one believed.
_CLOCK_SAMPLE_S = 10.0
# The longest pause a replica that has not reserved yet asks for (the orchestrators'
# default retry_after_cap_s).
_MAX_PAUSE_MS = 30_000.0
# How much later than its timeout a call may run before the waits it carries count as
# partly spent (more than the server clock's reading may be off by).
_LATE_RUN_S = 1.0
# A budget's name on the server (budget_id's): 32 hex digits.
_BUDGET_ID = re.compile(r"[0-9a-f]{32}")


@attrs.frozen
class BudgetGrant:
    """A turn: start after ``delay_s``, i.e. at ``at`` (``time.monotonic()``, from the
    server's clock: a slow reply does not make the turn late), ``turn_s`` on the server's;
    ``tokens`` were charged; the limits in force."""

    delay_s: float
    at: float
    turn_s: float  # the turn on the server's clock
    tokens: float
    requests_per_minute: int | None
    tokens_per_minute: int | None
    now_s: float = 0.0  # when the server handed it out, on its clock


@attrs.frozen
class BudgetLanes:
    """One budget as the server holds it (``conclave status``)."""

    budget: str
    requests_per_minute: int | None
    tokens_per_minute: int | None
    next_turn_ms: float  # how far ahead the next free turn is (0: free now)
    paused_ms: float
    turns: int


@attrs.define
class _Settlement:
    """What a replica has to tell the server about one budget, folded."""

    requests: float = 0.0  # given back (negative: charged more)
    tokens: float = 0.0
    advertised_rpm: int = 0
    advertised_tpm: int = 0
    # Until when (time.monotonic()): a report or a 429 held back by an outage must not
    # pause the cluster afresh from the server's return, long after its reset came.
    requests_wait_until: float = 0.0
    tokens_wait_until: float = 0.0
    pause_until: float = 0.0

    def merge(self, other: _Settlement) -> None:
        self.requests += other.requests
        self.tokens += other.tokens
        self.advertised_rpm = other.advertised_rpm or self.advertised_rpm
        self.advertised_tpm = other.advertised_tpm or self.advertised_tpm
        self.requests_wait_until = max(self.requests_wait_until, other.requests_wait_until)
        self.tokens_wait_until = max(self.tokens_wait_until, other.tokens_wait_until)
        self.pause_until = max(self.pause_until, other.pause_until)


#: ``listener(shift_s, at_s)``: a pause moved the turns handed out before ``at_s`` (the
#: server's clock; None: not said) later by ``shift_s``.
ShiftListener = Callable[[float, float | None], None]


class _ServerClock:
    """The server's clock on this process's ``time.monotonic()``: a turn is a server
    time, and the replica must wait for it on its own clock.  Calls queue on the client
    and replies wait for a busy loop, so neither the send nor the receipt time stands for
    the server's ``now``; the midpoint of the call with the shortest round trip does
    (Cristian's algorithm), to within half of it.  A sample older than
    :data:`_CLOCK_SAMPLE_S` gives way to a newer one nearly as good (the clocks drift
    apart); the first are taken on entry, before any load."""

    __slots__ = ("_offset", "_rtt", "_taken")

    def __init__(self) -> None:
        self._offset = 0.0
        self._rtt = math.inf
        self._taken = -math.inf

    def sample(self, server_s: float, sent: float, received: float) -> float:
        """Take one call's reading; returns the offset (server minus local) in force."""
        rtt = max(0.0, received - sent)
        aged = received - self._taken > _CLOCK_SAMPLE_S
        # A reading further off than its round trip allows: the server's clock was stepped
        # (the budget's times moved with it), and turns read with the old offset would all
        # be due at once, or wait out the step.
        stepped = abs(server_s - (sent + received) / 2.0 - self._offset) > max(1.0, rtt)
        if (
            rtt <= self._rtt
            or (aged and rtt <= max(2.0 * self._rtt, 0.002))
            or (stepped and math.isfinite(self._rtt))
        ):
            self._offset = server_s - (sent + received) / 2.0
            self._rtt = rtt
            self._taken = received
        return self._offset

    @property
    def offset(self) -> float:
        """The server's clock minus this process's ``time.monotonic()``, in seconds."""
        return self._offset


class ValkeyProviderBudget(BackgroundClient):
    """A shared store for :class:`~adapters.llm.provider_budget.ProviderLimits`
    (``shared=``), for ``async with``.

    Args:
        url: ``redis://``, ``rediss://``, ``valkey://``, ``valkeys://`` or ``unix://``.
        key_prefix: the prefix of its keys and channel (``<prefix>:budget:<id>``).
        replicas: how many replicas share the budget: while the server is unreachable,
            each paces at ``1 / replicas`` of the limits.
        timeout: how long one call may take before this replica falls back.
    """

    def __init__(
        self,
        url: str,
        *,
        key_prefix: str = "conclave",
        replicas: int = 1,
        timeout: float = 0.5,
    ) -> None:
        self._url = check_url(url)
        self.url = redact_url(self._url)
        self.key_prefix = check_name(key_prefix, "key_prefix")
        self.replicas = check_int(replicas, "replicas", at_least=1)
        self.timeout = check_timeout(timeout, "timeout")
        self._channel = f"{self.key_prefix}:budget:events"
        super().__init__()
        self._opened = False
        self._available = False
        self._problem: str | None = None
        self.outages = 0  # times this replica fell back
        self._down_at: float | None = None
        self.fallback_s = 0.0  # time spent in fallback, outages that ended
        self._pending: dict[str, _Settlement] = {}
        self._config: dict[str, tuple[int, int, float]] = {}  # id -> rpm, tpm, max_pause_ms
        self._urgent = False
        self._wake = trio.Event()
        self._watchers: dict[str, list[ShiftListener]] = {}
        self._back_listeners: list[Callable[[], None]] = []
        self._clock = _ServerClock()
        self.round_trips = 0  # calls to the server
        self.reservations = 0  # of which took a turn (one per request)

    def __repr__(self) -> str:
        state = "shared" if self._available else "fallback"
        return f"<ValkeyProviderBudget {self.key_prefix!r} {state} on {self.url}>"

    # ------------------------------------------------------------ state

    @property
    def available(self) -> bool:
        """Whether the last call reached the server (else: the local fallback)."""
        return self._available

    @property
    def opened(self) -> bool:
        return self._opened

    @property
    def problem(self) -> str | None:
        return self._problem

    def fallback_total_s(self) -> float:
        """Time spent in fallback so far (the outage under way included)."""
        ongoing = 0.0 if self._down_at is None else trio.current_time() - self._down_at
        return self.fallback_s + ongoing

    # ------------------------------------------------------------ the budget

    def _keys(self, bid: str) -> list[str]:
        key = f"{self.key_prefix}:budget:{bid}"
        return [key, f"{key}:corrupt"]

    async def reserve(
        self,
        bid: str,
        tokens: float,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        max_pause_s: float,
    ) -> BudgetGrant:
        """Take the next turn of budget ``bid`` for a request of ``tokens`` (one call,
        carrying what is pending for it); if the server is not reachable
        :class:`SharedBudgetUnavailableError` (nothing is charged then, as far as this
        replica knows)."""
        if not self._opened:
            raise RuntimeError("ValkeyProviderBudget is not open: use it in 'async with'")
        if not self._available:
            raise SharedBudgetUnavailableError(self._problem or "unreachable")
        config = (requests_per_minute or 0, tokens_per_minute or 0, max_pause_s * 1000.0)
        self._config[bid] = config
        pending = self._pending.pop(bid, None) or _Settlement()
        sent = time.monotonic()
        self.reservations += 1
        try:
            reply = await self._call("r", bid, config, pending, tokens)
        except StoreError as exc:
            raise SharedBudgetUnavailableError(str(exc)) from None
        received = time.monotonic()
        delay_us, charged, rlim, tlim, _paused, _turns, now_us, turn_us = reply
        offset = self._clock.sample(now_us / 1e6, sent, received)
        return BudgetGrant(
            delay_s=max(0, delay_us) / 1e6,
            at=turn_us / 1e6 - offset,
            turn_s=turn_us / 1e6,
            tokens=float(charged),
            requests_per_minute=rlim or None,
            tokens_per_minute=tlim or None,
            now_s=now_us / 1e6,
        )

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
    ) -> None:
        """Tell the server (soon, folded): ``requests`` / ``tokens`` given back (negative:
        charged more), limits advertised, a lane reported exhausted for ``*_wait_s``.
        Never blocks or raises."""
        self._queue(
            bid,
            _Settlement(
                requests=requests,
                tokens=tokens,
                advertised_rpm=advertised_rpm or 0,
                advertised_tpm=advertised_tpm or 0,
                requests_wait_until=_until(requests_wait_s),
                tokens_wait_until=_until(tokens_wait_s),
            ),
        )

    def pause(self, bid: str, seconds: float) -> None:
        """Pause budget ``bid`` for ``seconds`` cluster-wide (a 429): sent at once, and
        every replica's waiters move.  Never blocks or raises."""
        self._queue(bid, _Settlement(pause_until=_until(seconds)))
        self._urgent = True

    def on_available(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` when the server can be reached again after an outage;
        returns the unregister call.  Quick, no raise."""
        self._back_listeners.append(listener)

        def unregister() -> None:
            with contextlib.suppress(ValueError):
                self._back_listeners.remove(listener)

        return unregister

    async def flush(self) -> None:
        """Send what is pending now (e.g. before reporting a run); a failure is logged
        (the replica falls back), not raised."""
        self._require_client()
        if self._available:
            with contextlib.suppress(StoreError):
                await self._flush()

    def watch(self, bid: str, listener: ShiftListener) -> Callable[[], None]:
        """Call ``listener(shift_s, at_s)`` when a pause (at ``at_s``, the server's clock)
        moves budget ``bid``'s turns later;
        returns the unregister call.  It runs in the listener task: quick, no raise."""
        self._watchers.setdefault(bid, []).append(listener)

        def unregister() -> None:
            with contextlib.suppress(ValueError, KeyError):
                self._watchers[bid].remove(listener)

        return unregister

    async def capacity_counts(self) -> tuple[int, int]:
        """The shared capacity under the same prefix: agents in flight, agents queued
        (:class:`StoreError` if unreachable)."""
        return await read_counts(self._require_client(), self.key_prefix, self.timeout)

    async def lanes(self) -> list[BudgetLanes]:
        """Every budget under this prefix, as the server holds it now."""
        client = self._require_client()
        # The prefix is matched literally (a prefix may hold the glob's '*?[]\\'), and
        # only keys this prefix itself names count: another tenant's prefix may start
        # with ours ('<ours>:budget:<id>:budget:<its id>').
        head = f"{self.key_prefix}:budget:"
        pattern = "".join(f"\\{c}" if c in "*?[]\\" else c for c in head) + "*"
        found: list[BudgetLanes] = []

        async def read() -> None:
            now = (await client.time()).timestamp() * 1000.0
            async for raw in client.scan_iter(match=pattern, count=200, type_="hash"):
                key = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
                tail = key[len(head) :]
                if not key.startswith(head) or not _BUDGET_ID.fullmatch(tail):
                    continue
                fields = await client.hgetall(raw)
                found.append(_lanes(tail, fields, now))

        await store_call(read, self.timeout * 4)
        return sorted(found, key=lambda lanes: lanes.budget)

    # ------------------------------------------------------------ calls

    def _queue(self, bid: str, settlement: _Settlement) -> None:
        pending = self._pending.get(bid)
        if pending is None:
            self._pending[bid] = settlement
        else:
            pending.merge(settlement)
        self._wake.set()

    async def _call(
        self,
        op: str,
        bid: str,
        config: tuple[int, int, float],
        pending: _Settlement,
        tokens: float = 0.0,
    ) -> list[int]:
        rpm, tpm, max_pause_ms = config
        now = time.monotonic()
        args: list[Any] = [
            op,
            rpm,
            tpm,
            _num(tokens),
            _num(max_pause_ms),
            _num(pending.requests),
            _num(pending.tokens),
            pending.advertised_rpm,
            pending.advertised_tpm,
            _num(_left_ms(pending.requests_wait_until, now)),
            _num(_left_ms(pending.tokens_wait_until, now)),
            _num(_left_ms(pending.pause_until, now)),
            self._channel,
            bid,
            # By when (server ms) the call should run, give or take the clocks' error: a
            # call the server runs later (it was stopped; we gave up on it) pauses the
            # cluster only for what is left of the waits it carries.
            _num((now + self._clock.offset + self.timeout + _LATE_RUN_S) * 1000.0),
        ]
        keys = self._keys(bid)
        try:
            self.round_trips += 1
            reply: object = await store_call(
                lambda: self._script(keys=keys, args=args), self.timeout
            )
            if not isinstance(reply, list) or len(reply) != 8:
                raise StoreError("unexpected reply for the budget script")
            values = [to_int(value, "the budget script") for value in reply]
        except StoreError as exc:
            # What is idempotent is kept for later (a pause, what was learned); what is
            # not (given back, charged more) is dropped: it may have landed.
            pending.requests = pending.tokens = 0.0
            self._queue(bid, pending)
            self._down(str(exc))
            raise
        except BaseException:
            pending.requests = pending.tokens = 0.0
            self._queue(bid, pending)
            raise
        return values

    def _down(self, problem: str) -> None:
        self._problem = problem
        if not self._available:
            return
        self._available = False
        self.outages += 1
        self._down_at = trio.current_time()
        log.warning(
            "shared provider budget unreachable: each replica paces at its share of the "
            "limits until it is back",
            extra={
                "url": self.url,
                "key_prefix": self.key_prefix,
                "replicas": self.replicas,
                "problem": problem,
            },
        )
        self._wake.set()

    def _up(self) -> None:
        if self._available:
            return
        self._available = True
        self._problem = None
        if self._down_at is not None:
            self.fallback_s += trio.current_time() - self._down_at
            self._down_at = None
            log.warning(
                "shared provider budget reachable again: sharing resumed",
                extra={"url": self.url, "key_prefix": self.key_prefix},
            )
        self._wake.set()
        for listener in list(self._back_listeners):
            listener()

    # ------------------------------------------------------------ lifecycle

    def _require_client(self) -> Client:
        if self._client is None:
            raise RuntimeError("ValkeyProviderBudget is not open: use it in 'async with'")
        return self._client

    async def _start(self, client: Client, stack: AsyncExitStack) -> None:
        self._script = client.register_script(BUDGET)
        try:
            await store_call(client.ping, self.timeout)
            for _ in range(3):  # the server's clock, read while nothing else is sent
                sent = time.monotonic()
                now = await store_call(client.time, self.timeout)
                self._clock.sample(now.timestamp(), sent, time.monotonic())
        except StoreError as exc:
            self._available = True  # so that _down counts and logs this outage
            self._down(str(exc))
        else:
            self._available = True
        self._opened = True
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        await self._nursery.start(self._listen)
        self._nursery.start_soon(self._flush_loop)

    async def _before_close(self) -> None:
        # One last bounded send of what is pending (given back, learned).
        if self._available and self._pending:
            with contextlib.suppress(StoreError):
                await self._flush()

    def _after_close(self) -> None:
        self._opened = False
        if self._down_at is not None:
            self.fallback_s += trio.current_time() - self._down_at
            self._down_at = None

    async def _flush(self) -> None:
        for bid in list(self._pending):
            # Not reserved from here yet (a pause heard of first): no limits of ours.
            config = self._config.get(bid, (0, 0, _MAX_PAUSE_MS))
            pending = self._pending.pop(bid, None)
            if pending is not None:
                await self._call("s", bid, config, pending)

    async def _flush_loop(self) -> None:
        """Send what no call carried within SETTLE_DELAY_S (a pause: at once); while the
        server is unreachable, probe it every PROBE_EVERY_S."""
        while True:
            if self._available and not self._pending:
                await self._wake.wait()
            self._wake = trio.Event()
            if not self._available:
                await trio.sleep(PROBE_EVERY_S)
                try:
                    await store_call(self._require_client().ping, self.timeout)
                except StoreError as exc:
                    self._problem = str(exc)
                    continue
                self._up()
                continue
            if not self._urgent:
                await trio.sleep(SETTLE_DELAY_S)
            self._urgent = False
            with contextlib.suppress(StoreError):  # _call has marked it down
                await self._flush()

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the pause events; ``started`` after the first attempt."""
        client = self._require_client()
        started = False
        attempt = 0
        while True:
            try:
                async with client.pubsub(
                    channels=[self._channel],
                    ignore_subscribe_messages=True,
                    retry_policy=None,
                    subscription_timeout=self.timeout,
                ) as subscription:
                    attempt = 0
                    if not started:
                        started = True
                        task_status.started()
                    async for message in subscription:
                        if message["type"] == "message":
                            self._on_event(message["data"])
            except BaseException as exc:
                reraise_cancellation(exc)
                log.debug(
                    "shared provider budget: events subscription lost",
                    extra={"key_prefix": self.key_prefix, "problem": describe(exc)},
                )
            if not started:
                started = True
                task_status.started()
            await trio.sleep(backoff(attempt))
            attempt += 1

    def _on_event(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        parts = data.decode("utf-8", "replace").split()
        if len(parts) not in (2, 3):
            return
        try:
            shift_s = float(parts[1]) / 1000.0
            at_s = float(parts[2]) / 1000.0 if len(parts) == 3 else None
        except ValueError:
            return
        if not math.isfinite(shift_s) or shift_s <= 0:
            return
        if at_s is not None and not math.isfinite(at_s):
            at_s = None
        for listener in list(self._watchers.get(parts[0], ())):
            listener(shift_s, at_s)


def _until(seconds: float) -> float:
    """``seconds`` from now on ``time.monotonic()`` (0: none)."""
    return time.monotonic() + seconds if math.isfinite(seconds) and seconds > 0 else 0.0


def _left_ms(until: float, now: float) -> float:
    return max(0.0, until - now) * 1000.0


def _num(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "0"


def _lanes(bid: str, fields: dict[Any, Any], now_ms: float) -> BudgetLanes:
    def get(name: str) -> float:
        raw = fields.get(name.encode(), b"")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            return 0.0
        return value if math.isfinite(value) else 0.0

    ahead = max(get("rtat"), get("ttat")) - now_ms if now_ms else 0.0
    return BudgetLanes(
        budget=bid,
        requests_per_minute=int(get("rlim")) or None,
        tokens_per_minute=int(get("tlim")) or None,
        next_turn_ms=round(max(0.0, ahead), 1),
        paused_ms=round(max(0.0, get("pause") - now_ms), 1) if now_ms else 0.0,
        turns=int(get("sent")),
    )
