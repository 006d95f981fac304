"""FR10 across machines: one capacity shared by every process that uses the same server.

A counting semaphore with leases, kept on the server and changed only by atomic Lua
scripts (see :mod:`adapters.valkey._lua`): a sorted set of lease expiries, a FIFO queue of
waiters, and a grants channel.

* :meth:`ValkeyCapacity.reserve` takes every lease or none (reject mode), and never
  jumps the queue: it is refused while anyone waits.
* :meth:`ValkeyCapacity.acquire` takes one lease, or queues for it FIFO across every
  process and waits without polling: the script that frees a slot hands it to the head
  of the queue and publishes the grant.  Each (re)subscription, and each renewal, re-checks
  what this process waits for, so a grant published while it was not listening is
  not lost.
* :meth:`ValkeyCapacity.acquire_batch` does the same for a whole batch in one call
  (queue mode admits 72 agents in one round trip): granted where free, FIFO, the rest
  queued behind; each lease's :meth:`acquire` then only waits for its grant.
* :meth:`ValkeyCapacity.release` never blocks and never raises: it queues the release
  for a background task, which sends every queued release in one call.
* A background task renews every lease this process holds (and every place it keeps in
  the queue) each ``lease_s / 3`` seconds.  A process that dies stops renewing: its
  leases expire after ``lease_s`` and any script reclaims them.
* A lease this process cannot renew within ``lease_s`` of the last call that renewed it
  (counted from when that call was *sent*, so never later than the server lets it
  expire), or that the server lost and has no room for again, is *lost*: it is dropped
  and every listener registered with :meth:`ValkeyCapacity.on_lease_lost` is told, so
  its agent stops rather than run beyond the cluster's count.
* The server lost its books (flushed, restarted without persistence, a key corrupt; or
  a name never used): the scripts begin a new epoch and admit nothing for ``lease_s``
  (the grace), while every live holder re-asserts its leases on its next renewal; a
  process that sees the epoch change renews at once.  Admissions then resume.
* The server cannot be reached: :meth:`reserve` and :meth:`acquire` raise
  :class:`~kernel.AgentPoolExhaustedError` ("FR10: shared capacity unreachable: ...")
  having taken nothing; a waiter already queued keeps waiting through a short outage
  (its place is re-checked on reconnect) and is refused once the server has been
  unreachable for ``lease_s``.  Never over-admits.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from typing import Any, NamedTuple

import trio

from adapters.urls import redact_url
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
from adapters.valkey._lua import (
    ACQUIRE,
    ACQUIRE_BATCH,
    CAPACITY_CLAIM,
    RESERVE,
    RESERVE_EACH,
    SYNC,
)
from kernel import AgentPoolExhaustedError, InvalidRequestError
from kernel.validate import check_int, check_number

__all__ = ["ValkeyCapacity"]

log = logging.getLogger("adapters.valkey")

_MAX_LEASE_CHARS = 128
# What a lease id is (checked once per lease on every admission: a regex, not a loop).
_LEASE_ID = re.compile(rf"\S{{1,{_MAX_LEASE_CHARS}}}")
# The most leases one batch call carries: a script's reply is unpacked on Lua's stack,
# which holds a few thousand values; a bigger batch takes several calls, in order.
_BATCH_CALL_LEASES = 1000


class _Waiter:
    """One :meth:`ValkeyCapacity.acquire` waiting for its grant."""

    __slots__ = ("error", "event", "refreshed")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.error: str | None = None
        # When the last call that kept its place (and, once granted, its lease) was sent.
        self.refreshed = trio.current_time()


class _Joint:
    """The one-lease reserves asked for in one scheduler tick (the hedge calls of a batch
    fall due together): one call for all, each lease granted or refused alone."""

    __slots__ = ("abandoned", "done", "leases", "refusals")

    def __init__(self) -> None:
        self.leases: list[str] = []
        self.abandoned: set[str] = set()  # their callers were cancelled: give them back
        self.refusals: dict[str, str] = {}  # lease -> why it was refused
        self.done = trio.Event()


class _Books(NamedTuple):
    """Where the server's books stand, as every capacity script reports first."""

    epoch: int  # when they began (server ms): a change means they were lost
    grace_ms: int  # how long nothing new is admitted yet
    corrupt: str  # the keys set aside just now ("key=type ..."), or ""


#: A listener of lost leases: ``listener(lease, why)``.
LeaseLostListener = Callable[[str, str], None]


class ValkeyCapacity(BackgroundClient):
    """A :class:`~kernel.SharedCapacity` on a Valkey or Redis server, for ``async with``.

    ``AgentPool(max_concurrent, shared=capacity)`` admits a call only when both the
    pool and this capacity have room.  Every process that uses the same server and
    ``name`` shares one ``capacity``; configure them alike (a process that finds another
    capacity recorded under ``name`` logs a warning, and each enforces its own).

    Entering connects (bounded by ``timeout``), subscribes to the grants and starts the
    background task that renews leases and sends releases.  An unreachable server does
    not make entering fail: admissions are refused until it can be reached.  Leaving
    gives back whatever is still held (one last call, bounded by ``timeout``; if it
    cannot be made, the leases expire after ``lease_s``).

    Args:
        url: ``redis://``, ``rediss://``, ``valkey://``, ``valkeys://`` or ``unix://``.
        name: the prefix of the keys and channel (``<name>:leases`` ...).
        capacity: the most leases held at once across every process.
        lease_s: how long a lease outlives its last renewal (a dead process's slots come
            back after at most this long); renewed every ``lease_s / 3``; 0.1 to 86400.
        timeout: how long one call to the server may take before the admission is refused.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "conclave",
        capacity: int = 72,
        lease_s: float = 30.0,
        timeout: float = 1.0,
    ) -> None:
        self._url = check_url(url)
        self.url = redact_url(self._url)
        self.name = check_name(name, "name")
        self._capacity = check_int(capacity, "capacity", at_least=1)
        # At most a day: a dead process's slots come back within it, and its milliseconds
        # stay exact in Lua (1e306 s was accepted, then every acquire overflowed).
        self.lease_s = check_number(lease_s, "lease_s", at_least=0.1, at_most=86_400)
        self.timeout = check_timeout(timeout, "timeout")
        books = [f"{self.name}:{k}" for k in ("leases", "queue", "waiting", "ticket", "epoch")]
        self._keys = [*books, *(f"{key}:corrupt" for key in books)]
        self._grants = f"{self.name}:grants"
        super().__init__()
        self._held: dict[str, float] = {}  # lease -> until when it surely lives (trio time)
        self._waiters: dict[str, _Waiter] = {}
        # Leases asked for by acquire_batch whose acquire() has not claimed them yet.
        self._batched: set[str] = set()
        self._joint: _Joint | None = None  # the one-lease reserves of this tick
        self._pending: dict[str, float] = {}  # released lease -> when (trio time)
        self._wake = trio.Event()
        self._held_added = trio.Event()  # wakes the expiry watch
        self._recheck = False
        # One sync call at a time: a renewal sent after a release would re-add the lease.
        self._sync_lock = trio.Lock()
        self._in_use: int | None = None
        self._failing_since: float | None = None
        self._problem: str | None = None
        self._epoch: int | None = None
        self._grace_ends: float | None = None  # trio time, as of the last reply
        self._loss_listeners: list[LeaseLostListener] = []

    def __repr__(self) -> str:
        return f"<ValkeyCapacity {self.name!r} {self._in_use}/{self._capacity} on {self.url}>"

    # ------------------------------------------------------------ SharedCapacity

    @property
    def capacity(self) -> int:
        return self._capacity

    def in_use(self) -> int | None:
        """Leases in use cluster-wide, as of this process's last call (None when the last
        call failed, or before the first)."""
        return self._in_use

    @property
    def held(self) -> frozenset[str]:
        """The leases this process holds."""
        return frozenset(self._held)

    @property
    def waiting(self) -> frozenset[str]:
        """The leases this process is queued for."""
        return frozenset(self._waiters)

    async def reserve(self, leases: Sequence[str]) -> None:
        """Take one slot per lease now, all or none; else raise
        :class:`~kernel.AgentPoolExhaustedError` having taken none."""
        wanted = _check_leases(leases)
        mine = [lease for lease in wanted if lease in self._held or lease in self._waiters]
        if mine:
            raise InvalidRequestError(f"lease {mine[0]!r:.80} is already held or waiting")
        if not wanted:
            await trio.lowlevel.checkpoint()
            return
        self._require_open()
        if len(wanted) == 1:
            await self._reserve_alone(wanted[0])
            return
        args: list[Any] = [self._capacity, self._lease_ms, self._grants, *wanted]
        sent = trio.current_time()
        try:
            reply: object = await store_call(
                lambda: self._reserve_script(keys=self._keys, args=args), self.timeout
            )
            books, (ok, in_use, queued) = _books(reply, 3, "reserve")
        except StoreError as exc:
            self._failed(str(exc))
            self._forget(wanted)  # the call may have landed: give them back
            raise AgentPoolExhaustedError(self._unreachable(str(exc))) from None
        except BaseException:
            self._forget(wanted)
            raise
        self._reached(in_use)
        self._note(books, sent)
        if not ok:
            raise AgentPoolExhaustedError(self._refusal(books, in_use, queued, len(wanted)))
        self._held.update(dict.fromkeys(wanted, sent + self.lease_s))
        self._held_added.set()

    async def _reserve_alone(self, lease: str) -> None:
        """One lease, in one call with every other one-lease reserve of this tick."""
        joint = self._joint
        if joint is None:
            joint = self._joint = _Joint()
            assert self._nursery is not None
            # Runs from the next tick on: every reserve of this one has joined by then.
            self._nursery.start_soon(self._reserve_joint, joint)
        joint.leases.append(lease)
        try:
            await joint.done.wait()
        except BaseException:
            joint.abandoned.add(lease)  # if granted later, the call's task gives it back
            if self._held.pop(lease, None) is not None:
                self._forget([lease])  # granted already: give it back
            raise
        refusal = joint.refusals.get(lease)
        if refusal is not None:
            raise AgentPoolExhaustedError(refusal)

    async def _reserve_joint(self, joint: _Joint) -> None:
        """The call for a :class:`_Joint` (a background task: it never raises)."""
        self._joint = None
        leases = joint.leases
        args: list[Any] = [self._capacity, self._lease_ms, self._grants, *leases]
        sent = trio.current_time()
        try:
            reply: object = await store_call(
                lambda: self._reserve_each_script(keys=self._keys, args=args), self.timeout
            )
            books, (in_use, queued, *statuses) = _books(reply, 2, "reserve")
            if len(statuses) != len(leases):
                raise StoreError("unexpected reply to reserve")
        except StoreError as exc:
            self._failed(str(exc))
            self._forget(leases)  # the call may have landed: give them back
            joint.refusals = dict.fromkeys(leases, self._unreachable(str(exc)))
            joint.done.set()
            return
        except BaseException:  # cancelled: the capacity is closing
            self._forget(leases)
            joint.refusals = dict.fromkeys(leases, "FR10: shared capacity closed")
            joint.done.set()
            raise
        self._reached(in_use)
        self._note(books, sent)
        for lease, status in zip(leases, statuses, strict=True):
            if status != b"g":
                joint.refusals[lease] = self._refusal(books, in_use, queued, 1)
            elif lease in joint.abandoned:
                self._forget([lease])
            else:
                self._held[lease] = sent + self.lease_s
        self._held_added.set()
        joint.done.set()

    async def acquire_batch(self, leases: Sequence[str]) -> None:
        """Ask for every lease in one call (see :class:`~kernel.BatchAcquirer`): each is
        granted now if a slot is free and nobody waits, else queued FIFO; then
        :meth:`acquire` of each returns at once if it was granted, or waits for its grant.

        Raises :class:`~kernel.AgentPoolExhaustedError` if the server cannot be reached,
        having taken none (what the call may have taken is given back); cancelled, it
        holds none.
        """
        wanted = _check_leases(leases)
        self._require_open()
        mine = [lease for lease in wanted if lease in self._held or lease in self._waiters]
        if mine:
            raise InvalidRequestError(f"lease {mine[0]!r:.80} is already held or waiting")
        # Waiters first: a grant published while the call is out finds its waiter.
        waiters = {lease: _Waiter() for lease in wanted}
        self._waiters.update(waiters)
        try:
            for start in range(0, len(wanted), _BATCH_CALL_LEASES):
                await self._acquire_chunk(wanted[start : start + _BATCH_CALL_LEASES], waiters)
        except BaseException as exc:
            for lease, waiter in waiters.items():
                if self._waiters.get(lease) is waiter:
                    del self._waiters[lease]
                self._held.pop(lease, None)
            self._forget(wanted)  # the call may have landed: give them back
            if isinstance(exc, StoreError):
                self._failed(str(exc))
                raise AgentPoolExhaustedError(self._unreachable(str(exc))) from None
            raise
        self._batched.update(wanted)
        if not wanted:
            await trio.lowlevel.checkpoint()

    async def _acquire_chunk(self, leases: list[str], waiters: dict[str, _Waiter]) -> None:
        args: list[Any] = [self._capacity, self._lease_ms, self._grants, *leases]
        sent = trio.current_time()
        reply: object = await store_call(
            lambda: self._acquire_batch_script(keys=self._keys, args=args), self.timeout
        )
        books, (in_use, _queued, *statuses) = _books(reply, 2, "acquire batch")
        if len(statuses) != len(leases):
            raise StoreError("unexpected reply to acquire batch")
        self._reached(in_use)
        self._note(books, sent)
        for lease, status in zip(leases, statuses, strict=True):
            waiter = waiters[lease]
            waiter.refreshed = sent
            if status == b"g" and self._waiters.get(lease) is waiter:
                # Held from now: renewed, watched for expiry and loss like any other.
                del self._waiters[lease]
                self._held[lease] = sent + self.lease_s
        self._held_added.set()

    async def acquire(self, lease: str) -> None:
        """Take one slot, waiting FIFO (across every process) until one is free; for a
        lease of :meth:`acquire_batch`, complete its acquisition (no further call).

        Cancelled, it holds nothing.  Raises :class:`~kernel.AgentPoolExhaustedError` if the
        server cannot be reached (or stays unreachable for ``lease_s`` while queued).
        """
        if lease.__class__ is str and lease in self._batched:
            self._batched.discard(lease)
            waiter = self._waiters.get(lease)
            if waiter is None:
                # Granted by the batch call (or lost since: its listeners were told).
                await trio.lowlevel.checkpoint()
                return
            await self._await_grant(lease, waiter)
            return
        (lease,) = _check_leases([lease])
        self._require_open()
        if lease in self._held or lease in self._waiters:
            raise InvalidRequestError(f"lease {lease!r} is already held or waiting")
        waiter = self._waiters[lease] = _Waiter()
        args: list[Any] = [self._capacity, self._lease_ms, self._grants, lease]
        try:
            try:
                reply: object = await store_call(
                    lambda: self._acquire_script(keys=self._keys, args=args), self.timeout
                )
                books, (granted, in_use, _place) = _books(reply, 3, "acquire")
            except StoreError as exc:
                self._failed(str(exc))
                raise AgentPoolExhaustedError(self._unreachable(str(exc))) from None
            self._reached(in_use)
            self._note(books, waiter.refreshed)
        except BaseException:
            if self._waiters.get(lease) is waiter:
                del self._waiters[lease]
            self._forget([lease])  # withdraw, or give back a grant that came too late
            raise
        if granted:
            waiter.event.set()
        await self._await_grant(lease, waiter)

    async def _await_grant(self, lease: str, waiter: _Waiter) -> None:
        """Wait for a queued lease's grant, then hold it; cancelled or refused, withdraw."""
        try:
            await waiter.event.wait()
            if waiter.error is not None:
                raise AgentPoolExhaustedError(waiter.error)
        except BaseException:
            if self._waiters.get(lease) is waiter:
                del self._waiters[lease]
            self._forget([lease])  # withdraw, or give back a grant that came too late
            raise
        del self._waiters[lease]
        self._held[lease] = waiter.refreshed + self.lease_s
        self._held_added.set()

    async def flush(self) -> None:
        """Send the queued releases now and refresh :meth:`in_use` (e.g. before reporting
        a run); a failure is logged, not raised (the background task retries)."""
        self._require_open()
        try:
            await self._sync(renew=False, always=True)
        except StoreError as exc:
            self._failed(str(exc))

    def release(self, lease: str) -> None:
        """Give a slot back, or withdraw a lease still waiting.  Never blocks or raises:
        the server is told in the background; idempotent."""
        self._batched.discard(lease)
        if lease in self._held:
            del self._held[lease]
            self._queue_release(lease)
        elif lease in self._waiters:
            waiter = self._waiters.pop(lease)
            waiter.error = f"FR10: lease {lease} withdrawn while queued"
            waiter.event.set()
            self._queue_release(lease)
        # Else never held here (a refused reserve), or already given back: nothing to do.

    def on_lease_lost(self, listener: LeaseLostListener) -> Callable[[], None]:
        """Call ``listener(lease, why)`` when a lease this process holds is lost (see
        :class:`~kernel.LeaseLossNotifier`); returns the unregister call.  It runs in the
        capacity's background task: it must be quick and must not raise."""
        self._loss_listeners.append(listener)

        def unregister() -> None:
            with contextlib.suppress(ValueError):
                self._loss_listeners.remove(listener)

        return unregister

    # ------------------------------------------------------------ lifecycle

    async def _start(self, client: Client, stack: AsyncExitStack) -> None:
        self._reserve_script = client.register_script(RESERVE)
        self._acquire_script = client.register_script(ACQUIRE)
        self._acquire_batch_script = client.register_script(ACQUIRE_BATCH)
        self._reserve_each_script = client.register_script(RESERVE_EACH)
        self._sync_script = client.register_script(SYNC)
        await self._claim_capacity(client)
        await self._first_sync()
        self._nursery = await stack.enter_async_context(trio.open_nursery())
        await self._nursery.start(self._listen)
        await self._nursery.start(self._sync_loop)
        await self._nursery.start(self._watch_expiry)

    async def _before_close(self) -> None:
        for lease in [*self._held, *self._waiters]:
            self.release(lease)
        if self._pending:
            with trio.move_on_after(self.timeout, shield=True):
                try:
                    await self._sync(renew=False)
                except StoreError as problem:
                    log.warning(
                        "shared capacity: leases not given back on close; they expire",
                        extra={"capacity_name": self.name, "problem": str(problem)},
                    )

    def _after_close(self) -> None:
        self._pending.clear()

    async def _claim_capacity(self, client: Client) -> None:
        """Connect now (not on a batch's first admission) and compare capacities."""
        key = f"{self.name}:capacity"
        try:
            reply = await store_call(
                lambda: client.eval(
                    CAPACITY_CLAIM, keys=[key, f"{key}:corrupt"], args=[self._capacity]
                ),
                self.timeout,
            )
            if not isinstance(reply, list) or len(reply) != 2:
                raise StoreError("unexpected reply to the capacity claim")
            recorded, corrupt = reply
        except StoreError as exc:
            self._failed(str(exc))
            return
        if corrupt:
            log.error(
                "shared capacity: corrupt key set aside",
                extra={"capacity_name": self.name, "corrupt_keys": f"{key}={_text(corrupt)}"},
            )
        if recorded != str(self._capacity).encode():
            log.warning(
                "shared capacity configured differently elsewhere; each process enforces its own",
                extra={"capacity_name": self.name, "capacity": self._capacity},
            )

    async def _first_sync(self) -> None:
        """The count in use, known from the start (and any leases this process had)."""
        try:
            await self._sync(renew=True)
        except StoreError as exc:
            self._failed(str(exc))

    # ------------------------------------------------------------ background

    async def _listen(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Follow the grants channel; after every (re)subscription, ask for a re-check of
        what this process waits for.  ``started`` after the first attempt."""
        client = self._client
        assert client is not None
        started = False
        attempt = 0
        while True:
            try:
                async with client.pubsub(
                    channels=[self._grants],
                    ignore_subscribe_messages=True,
                    retry_policy=None,  # we reconnect ourselves, and re-check when we do
                    subscription_timeout=self.timeout,
                ) as subscription:
                    attempt = 0
                    self._request_recheck()
                    if not started:
                        started = True
                        task_status.started()
                    async for message in subscription:
                        if message["type"] == "message":
                            self._on_grants(message["data"])
            except BaseException as exc:
                reraise_cancellation(exc)
                log.warning(
                    "shared capacity: grants subscription lost",
                    extra={"capacity_name": self.name, "problem": describe(exc)},
                )
            self._request_recheck()
            if not started:
                started = True
                task_status.started()
            await trio.sleep(backoff(attempt))
            attempt += 1

    def _on_grants(self, data: object) -> None:
        if not isinstance(data, bytes):
            return
        for lease in data.decode("utf-8", "replace").split():
            waiter = self._waiters.get(lease)
            if waiter is not None:
                waiter.event.set()

    async def _sync_loop(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Send releases as they come, renew every ``lease_s / 3``, re-check on request
        (and when the grace ends, for the waiters); drop the leases it could not renew."""
        task_status.started()
        renew_every = self.lease_s / 3
        next_renewal = trio.current_time() + renew_every
        failures = 0
        while True:
            if not self._pending and not self._recheck:
                with trio.move_on_at(self._next_wake(next_renewal)):
                    await self._wake.wait()
            self._wake = trio.Event()
            now = trio.current_time()
            grace_over = self._grace_ends is not None and now >= self._grace_ends
            renew = self._recheck or now >= next_renewal or (grace_over and bool(self._waiters))
            self._recheck = False
            try:
                await self._sync(renew=renew)
            except StoreError as exc:
                self._failed(str(exc))
                self._recheck = self._recheck or renew
                await trio.sleep(backoff(failures))
                failures += 1
                continue
            failures = 0
            if renew:
                next_renewal = trio.current_time() + renew_every

    def _next_wake(self, next_renewal: float) -> float:
        """The next renewal, or the end of the grace if sooner (for the waiters)."""
        if self._grace_ends is not None and self._waiters:
            return min(next_renewal, self._grace_ends)
        return next_renewal

    async def _watch_expiry(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Drop each held lease the moment it may have expired: a task of its own, so a
        call to a hung server (up to ``timeout``) never delays it."""
        task_status.started()
        while True:
            with trio.move_on_at(min(self._held.values(), default=math.inf)):
                await self._held_added.wait()
            self._held_added = trio.Event()
            self._drop_expired()

    def _drop_expired(self) -> None:
        """Every held lease past the time it surely lived is lost (the server may have
        let it go: this process's agent must not keep running on it)."""
        now = trio.current_time()
        for lease in [lease for lease, until in self._held.items() if until <= now]:
            problem = self._problem or "no answer"
            self._lose(lease, f"not renewed within lease_s ({self.lease_s:g} s): {problem}")

    async def _sync(self, *, renew: bool, always: bool = False) -> None:
        """One call: the queued releases, and (``renew``) every lease held and waited for;
        none if there is nothing to send, unless ``always``."""
        async with self._sync_lock:
            await self._sync_now(renew=renew, always=always)

    async def _sync_now(self, *, renew: bool, always: bool) -> None:
        releases = list(self._pending)
        held = list(self._held) if renew else []
        waiting = list(self._waiters) if renew else []
        if not releases and not renew and not always:
            return
        args: list[Any] = [
            self._capacity,
            self._lease_ms,
            self._grants,
            len(releases),
            len(held),
            *releases,
            *held,
            *waiting,
        ]
        sent = trio.current_time()
        reply: object = await store_call(
            lambda: self._sync_script(keys=self._keys, args=args), self.timeout
        )
        books, (in_use, _queued, *statuses) = _books(reply, 2, "sync")
        if len(statuses) != len(held) + len(waiting):
            raise StoreError("unexpected reply to the lease sync")
        for lease in releases:
            self._pending.pop(lease, None)
        self._reached(in_use)
        self._note(books, sent)
        self._renewed(held, statuses[: len(held)], sent)
        for lease, status in zip(waiting, statuses[len(held) :], strict=True):
            waiter = self._waiters.get(lease)
            if waiter is not None:
                waiter.refreshed = sent
                if status == b"g":
                    waiter.event.set()

    def _renewed(self, held: list[str], statuses: Sequence[object], sent: float) -> None:
        """Note what a renewal said of each lease held: renewed, re-added or lost."""
        until = sent + self.lease_s
        for lease, status in zip(held, statuses, strict=True):
            if lease not in self._held:
                continue  # released (or lost) while the call was out
            if status == b"l":
                self._lose(lease, "the server lost it and has no room for it again")
                continue
            if status == b"r" and self._grace_ends is None:
                log.warning(
                    "shared capacity: a lease the server lost was re-added",
                    extra={"capacity_name": self.name, "lease_s": self.lease_s},
                )
            self._held[lease] = max(self._held[lease], until)

    def _note(self, books: _Books, sent: float) -> None:
        """Where the books stand: corrupt keys set aside, a new epoch (the server lost
        them: re-assert every lease now, not at the next renewal), the grace."""
        if books.corrupt:
            log.error(
                "shared capacity: corrupt keys set aside; its books start again",
                extra={"capacity_name": self.name, "corrupt_keys": books.corrupt},
            )
        if self._epoch is not None and books.epoch != self._epoch:
            log.warning(
                "shared capacity: the server lost its lease records; re-asserting ours, "
                "nothing new admitted until the grace ends",
                extra={"capacity_name": self.name, "grace_s": books.grace_ms / 1000},
            )
            self._request_recheck()
        self._epoch = books.epoch
        self._grace_ends = sent + books.grace_ms / 1000 if books.grace_ms else None

    def _lose(self, lease: str, why: str) -> None:
        """A held lease is lost: drop it (a release is sent, in case the server still
        counts it) and tell the listeners, so its agent stops."""
        del self._held[lease]
        self._queue_release(lease)
        log.error(
            "shared capacity lease lost; its agent is stopped",
            extra={"capacity_name": self.name, "problem": why},
        )
        for listener in list(self._loss_listeners):
            try:
                listener(lease, why)
            except Exception:
                log.exception(
                    "shared capacity: a lease-loss listener raised; ignored",
                    extra={"capacity_name": self.name},
                )

    # ------------------------------------------------------------ state

    @property
    def _lease_ms(self) -> int:
        return max(1, round(self.lease_s * 1000))

    def _queue_release(self, lease: str) -> None:
        if self._nursery is None:
            return  # closed: the lease expires on its own
        self._pending[lease] = trio.current_time()
        self._wake.set()

    def _forget(self, leases: Sequence[str]) -> None:
        """Release leases whose fate on the server is unknown (a call that failed)."""
        for lease in leases:
            self._queue_release(lease)

    def _request_recheck(self) -> None:
        self._recheck = True
        self._wake.set()

    def _reached(self, in_use: int) -> None:
        self._in_use = in_use
        if self._failing_since is not None:
            log.warning("shared capacity reachable again", extra={"capacity_name": self.name})
            self._failing_since = None
            self._problem = None

    def _failed(self, problem: str) -> None:
        """A call failed: the count is unknown; waiters give up after ``lease_s`` of it;
        releases older than ``lease_s`` are dropped (those leases have expired)."""
        now = trio.current_time()
        self._in_use = None
        if self._failing_since is None:
            self._failing_since = now
        if problem != self._problem:
            log.error(
                "shared capacity unreachable; admissions refused",
                extra={"capacity_name": self.name, "capacity_url": self.url, "problem": problem},
            )
            self._problem = problem
        for lease, when in list(self._pending.items()):
            if now - when > self.lease_s:
                del self._pending[lease]
        if now - self._failing_since >= self.lease_s:
            for waiter in self._waiters.values():
                if not waiter.event.is_set():
                    waiter.error = self._unreachable(f"{problem} (for {self.lease_s:g} s)")
                    waiter.event.set()

    def _refusal(self, books: _Books, in_use: int, queued: int, wanted: int) -> str:
        """Why a reserve of ``wanted`` leases was refused."""
        if books.grace_ms:
            return self._recovering(books)
        if queued:
            return (
                f"FR10: shared capacity {self.name!r} busy: {queued} agent(s) are queued "
                "for it cluster-wide, and reject mode does not jump the queue"
            )
        return (
            f"FR10: shared capacity exhausted: {in_use} in use + {wanted} requested "
            f"> {self._capacity} ({self.name!r} on {self.url})"
        )

    def _recovering(self, books: _Books) -> str:
        why = (
            f"its keys were corrupt ({books.corrupt}; set aside as <key>:corrupt)"
            if books.corrupt
            else "the server has no record of its leases (a new name, or the server lost its data)"
        )
        return (
            f"FR10: shared capacity {self.name!r} recovering: {why}; nothing new is admitted "
            f"for {books.grace_ms / 1000:.1f} s more, until every live holder has re-asserted "
            f"its leases ({self.url})"
        )

    def _unreachable(self, problem: str) -> str:
        return f"FR10: shared capacity unreachable: {self.url}: {problem}"

    def _require_open(self) -> None:
        if self._client is None:
            raise AgentPoolExhaustedError(
                "FR10: shared capacity unreachable: not open (use 'async with ValkeyCapacity(...)')"
            )


def _check_leases(leases: Sequence[str]) -> list[str]:
    if isinstance(leases, str | bytes):
        raise InvalidRequestError("leases must be a sequence of lease ids, not one string")
    checked = []
    for lease in leases:
        if not isinstance(lease, str) or _LEASE_ID.fullmatch(lease) is None:
            raise InvalidRequestError(
                f"a lease id is a non-empty string of at most {_MAX_LEASE_CHARS} characters "
                f"without whitespace, got {lease!r:.80}"
            )
        checked.append(lease)
    if len(set(checked)) != len(checked):
        raise InvalidRequestError("lease ids must be distinct")
    return checked


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _books(reply: object, n: int, what: str) -> tuple[_Books, list[Any]]:
    """A capacity script's reply: where the books stand, then ``n`` ints, then the rest."""
    if not isinstance(reply, list) or len(reply) < 3 + n:
        raise StoreError(f"unexpected reply to {what}")
    corrupt = reply[2]
    if not isinstance(corrupt, bytes):
        raise StoreError(f"unexpected reply for {what}: {type(corrupt).__name__}")
    books = _Books(
        to_int(reply[0], what), to_int(reply[1], what), corrupt.decode("utf-8", "replace")
    )
    return books, [*(to_int(v, what) for v in reply[3 : 3 + n]), *reply[3 + n :]]


async def read_counts(client: Client, name: str, limit: float) -> tuple[int, int]:
    """The leases in use and the agents queued of capacity ``name``, read-only (for
    ``conclave status``: no claim, no sync, no grace begun)."""

    async def read() -> tuple[int, int]:
        return await client.zcard(f"{name}:leases"), await client.zcard(f"{name}:queue")

    return await store_call(read, limit)
