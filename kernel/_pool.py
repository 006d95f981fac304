"""FR10 admission control: which agents are in flight, and never more than the capacity."""

from __future__ import annotations

import itertools
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence

import trio

from kernel._errors import AgentBusyError, AgentPoolExhaustedError, InvalidRequestError
from kernel._ports import BatchAcquirer, LeaseLossNotifier, SharedCapacity
from kernel._slot import Slot
from kernel._types import MAX_CONCURRENT_AGENTS, PoolStatistics, PoolStatus
from kernel.validate import check_text

__all__ = ["Admission", "AgentPool", "PoolStatistics", "Slot"]

log = logging.getLogger("kernel.pool")


def _check_agent_ids(agent_ids: Iterable[str]) -> list[str]:
    if isinstance(agent_ids, str | bytes):
        raise InvalidRequestError("agent_ids must be a collection of ids, not a single string")
    # The common case without a call per id: a non-blank str.
    ids = [a if a.__class__ is str and a.strip() else check_text(a, "agent_id") for a in agent_ids]
    return list(dict.fromkeys(ids))  # de-duplicate, keep order


class AgentPool:
    """Admission control keyed by agent id, bounded by a ``trio.CapacityLimiter``.

    An agent is *active* while it holds a slot, and a slot is a token of
    :attr:`limiter`: the set of active agents and the limiter's borrowers are the same
    thing seen two ways, so the number of agents running can never exceed
    ``max_concurrent`` however batches interleave, whether they were admitted all at
    once (``overflow="reject"``) or wait for slots (``overflow="queue"``).

    The synchronous methods are atomic with respect to other trio tasks (they never
    checkpoint).  :meth:`try_acquire_batch` reserves every id or none.  An agent id
    can be active at most once; an agent queued by another batch counts as busy.

    With a ``shared`` capacity (a :class:`~kernel.SharedCapacity`, e.g. one on a Valkey
    server that several processes use), a slot is also a lease of the shared capacity:
    a batch is admitted only when both have room, all or nothing in reject mode.  Taking
    a shared lease needs the network, so such a pool admits only through :meth:`admit`
    (``async with``); its synchronous :meth:`acquire` and :meth:`try_acquire_batch`
    refuse with :class:`InvalidRequestError` rather than admit past the shared bound.  A
    capacity that is also a :class:`~kernel.LeaseLossNotifier` is listened to while the
    pool holds leases: a lost lease cancels its slot's :meth:`Slot.guard` scope.

    The pool is not thread-safe: use it from the trio thread that runs the kernel.
    """

    def __init__(
        self, max_concurrent: int = MAX_CONCURRENT_AGENTS, *, shared: SharedCapacity | None = None
    ) -> None:
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise InvalidRequestError(
                f"max_concurrent must be an int, got {type(max_concurrent).__name__}"
            )
        if max_concurrent < 1:
            raise InvalidRequestError(f"FR10: max_concurrent must be >= 1, got {max_concurrent}")
        if shared is not None and not isinstance(shared, SharedCapacity):
            raise InvalidRequestError(
                f"shared must be a SharedCapacity (reserve/acquire/release), "
                f"got {type(shared).__name__}"
            )
        self._max = max_concurrent
        self._shared = shared
        # The slots holding a shared lease, by lease; the pool listens for lost leases
        # while it has any (not for its whole life: a capacity outlives many pools).
        self._leased: dict[str, Slot] = {}
        self._notifier: LeaseLossNotifier | None = (
            shared if isinstance(shared, LeaseLossNotifier) else None
        )
        self._stop_listening: Callable[[], None] | None = None
        # Lease ids: unique across processes by a random prefix, within the pool by a
        # counter (a fresh uuid4 per lease cost a few microseconds of each admission).
        self._lease_prefix = uuid.uuid4().hex[:20]
        self._lease_numbers = itertools.count()
        self.limiter = trio.CapacityLimiter(max_concurrent)
        self._active: dict[str, Slot] = {}
        self._extra: set[Slot] = set()
        # Agents admitted by a queueing batch that are still waiting for a slot.
        self._queued: set[str] = set()

    def __repr__(self) -> str:
        return f"<AgentPool {len(self._active)}/{self._max} active, {len(self._queued)} queued>"

    # ------------------------------------------------------------ read side

    def statistics(self) -> PoolStatistics:
        """What the pool holds now, in one frozen snapshot (no checkpoint)."""
        return PoolStatistics(
            max_concurrent=self._max,
            active_count=len(self._active),
            hedge_calls=len(self._extra),
            available_count=int(self.limiter.available_tokens),
            queued_count=len(self._queued),
            tasks_waiting=self.limiter.statistics().tasks_waiting,
            leases=len(self._leased),
        )

    @property
    def max_concurrent(self) -> int:
        return self._max

    @property
    def active_count(self) -> int:
        return len(self._active)

    @property
    def available_count(self) -> int:
        """Slots free right now (tokens borrowed outside the pool count as used)."""
        return int(self.limiter.available_tokens)

    @property
    def is_exhausted(self) -> bool:
        return self.available_count == 0

    @property
    def active_agents(self) -> frozenset[str]:
        return frozenset(self._active)

    def is_active(self, agent_id: str) -> bool:
        return agent_id in self._active

    @property
    def shared(self) -> SharedCapacity | None:
        return self._shared

    def status(self) -> PoolStatus:
        shared = self._shared
        return PoolStatus(
            active_count=self.active_count,
            available_count=self.available_count,
            max_concurrent=self._max,
            shared_capacity=None if shared is None else shared.capacity,
            shared_in_use=None if shared is None else shared.in_use(),
        )

    # ------------------------------------------------------------ public write side

    def acquire(self, agent_id: str) -> bool:
        """Reserve a slot for one agent.

        Returns False if the agent is already active (or queued); raises
        :class:`AgentPoolExhaustedError` if no slot is free.
        """
        agent_id = check_text(agent_id, "agent_id")
        self._check_local_only("acquire")
        if self._is_busy(agent_id):
            return False
        self._reserve([agent_id])
        return True

    def release(self, agent_id: str) -> bool:
        """Give back one agent's slot; False if it was not active."""
        slot = self._active.get(agent_id)
        if slot is None:
            return False
        self._release(slot)
        return True

    def try_acquire_batch(self, agent_ids: Iterable[str]) -> tuple[bool, str | None]:
        """Reserve every agent or none.  Returns ``(True, None)`` or ``(False, reason)``.

        Fails if any id is already active or queued, or if
        ``active + len(set(agent_ids)) > max_concurrent``.  Never reserves partially.
        """
        ids = _check_agent_ids(agent_ids)
        self._check_local_only("try_acquire_batch")
        try:
            self._check_not_busy(ids)
            self._reserve(ids)
        except AgentPoolExhaustedError as exc:
            return False, str(exc)
        return True, None

    def release_batch(self, agent_ids: Iterable[str]) -> int:
        """Release each active id given; returns how many were released."""
        return sum(self.release(a) for a in _check_agent_ids(agent_ids))

    def reset(self) -> int:
        """Release every slot and forget queued claims; returns how many were active.

        For recovery only: work still running keeps going, but its slots are already
        back, and its own release later is recognised as stale and ignored.
        """
        count = len(self._active)
        for slot in [*self._active.values(), *self._extra]:
            self._release(slot)
        self._queued.clear()
        if count:
            log.warning("agent pool reset", extra={"released_count": count})
        return count

    # ------------------------------------------------------------ admission (the service's side)

    @property
    def queued_agents(self) -> frozenset[str]:
        """Agents admitted by a queueing batch that are still waiting for a slot."""
        return frozenset(self._queued)

    def admit(self, agent_ids: Iterable[str], *, queue: bool = False) -> Admission:
        """Admit a batch, all or nothing: an :class:`Admission` to use as ``async with``.

        ``queue=False`` (FR10 reject mode) takes one slot per agent at once, or raises
        :class:`AgentPoolExhaustedError` (not enough free slots) or
        :class:`AgentBusyError` (an id is active or queued elsewhere) having taken
        nothing; with a shared capacity, entering the block takes the shared leases too,
        all or none (``AgentPoolExhaustedError`` if the cluster is full or unreachable).
        ``queue=True`` only marks the ids busy; each then waits for its slot with
        :meth:`Admission.take_slot`, FIFO with every other waiter of the pool (and of the
        cluster).

        Leaving the block gives back every slot and claim still held, on every path
        (success, error, cancellation).
        """
        ids = _check_agent_ids(agent_ids)
        self._check_not_busy(ids)
        if queue:
            self._queued.update(ids)
            return Admission(self, ids, [])
        return Admission(self, [], self._reserve(ids))

    # ------------------------------------------------------------ private

    def _check_local_only(self, method: str) -> None:
        if self._shared is not None:
            raise InvalidRequestError(
                f"FR10: {method}() cannot take shared leases without the network; "
                "a pool with a shared capacity admits through 'async with pool.admit(...)'"
            )

    def _lease(self) -> str | None:
        if self._shared is None:
            return None
        return f"{self._lease_prefix}-{next(self._lease_numbers):x}"

    def _is_busy(self, agent_id: str) -> bool:
        return agent_id in self._active or agent_id in self._queued

    def _check_not_busy(self, agent_ids: list[str]) -> None:
        busy = [a for a in agent_ids if self._is_busy(a)]
        if busy:
            shown = ", ".join(repr(a) for a in busy[:5]) + (" ..." if len(busy) > 5 else "")
            raise AgentBusyError(
                f"FR10: {len(busy)} agent(s) already active in another batch: {shown}"
            )

    def _reserve(self, agent_ids: list[str]) -> list[Slot]:
        """Atomically take one slot per (distinct, validated, not busy) id, or raise."""
        free = self.available_count
        if len(agent_ids) > free:
            raise AgentPoolExhaustedError(
                f"FR10: agent pool exhausted: {self._max - free} active + "
                f"{len(agent_ids)} requested > {self._max}"
            )
        slots = []
        shared = self._shared is not None
        for agent_id in agent_ids:
            slot = Slot(agent_id, lease=self._lease() if shared else None)
            # Cannot block: we checked the free count and nothing ran in between.
            self.limiter.acquire_on_behalf_of_nowait(slot)
            self._active[agent_id] = slot
            self._track(slot)
            slots.append(slot)
        return slots

    async def _take_slot(self, agent_id: str) -> Slot:
        """Wait (FIFO, shared with every other waiter of the limiter) for a claimed id's slot,
        then for its shared lease, if any."""
        slot = Slot(agent_id, lease=self._lease())
        await self.limiter.acquire_on_behalf_of(slot)
        if agent_id in self._active:  # only after a reset() let another batch take the id
            self.limiter.release_on_behalf_of(slot)
            raise AgentBusyError(f"FR10: agent {agent_id!r} became active in another batch")
        self._queued.discard(agent_id)
        self._active[agent_id] = slot
        self._track(slot)
        if slot.lease is not None:
            assert self._shared is not None
            try:
                await self._shared.acquire(slot.lease)
            except BaseException:
                self._release(slot)  # withdraws the lease too
                self._queued.add(agent_id)
                raise
        return slot

    async def _take_ahead(self, agent_ids: Sequence[str]) -> list[Slot]:
        """The slots free now for the first of these claimed ids, in order (none while
        anyone waits for a slot: FIFO), with all their shared leases asked for in one call;
        each lease is then granted or queued, and its slot's :meth:`_claim` completes it.
        Only with a :class:`~kernel.BatchAcquirer`; else none (each id takes its own)."""
        shared = self._shared
        if not isinstance(shared, BatchAcquirer):
            return []
        slots: list[Slot] = []
        for agent_id in agent_ids:
            if agent_id not in self._queued or agent_id in self._active:
                break  # not claimed here (or taken by another batch after a reset)
            slot = Slot(agent_id, lease=self._lease())
            try:
                self.limiter.acquire_on_behalf_of_nowait(slot)
            except trio.WouldBlock:
                break
            self._queued.discard(agent_id)
            self._active[agent_id] = slot
            self._track(slot)
            slots.append(slot)
        if slots:
            try:
                await shared.acquire_batch([s.lease for s in slots if s.lease is not None])
            except BaseException:
                for slot in slots:
                    self._release(slot)  # withdraws its lease too
                    self._queued.add(slot.agent_id)
                raise
        return slots

    async def _claim(self, slot: Slot) -> None:
        """Wait for the grant of a slot's lease asked for by :meth:`_take_ahead`."""
        assert self._shared is not None and slot.lease is not None
        try:
            await self._shared.acquire(slot.lease)
        except BaseException:
            self._release(slot)
            self._queued.add(slot.agent_id)
            raise

    async def _take_extra_slot(self, agent_id: str) -> Slot | None:
        """A second slot for an active agent if one is free now and nobody waits for it."""
        if agent_id not in self._active:
            return None
        slot = Slot(agent_id, extra=True, lease=self._lease())
        try:
            # Fails while anyone waits in the limiter: a hedge never jumps the queue.
            self.limiter.acquire_on_behalf_of_nowait(slot)
        except trio.WouldBlock:
            return None
        self._extra.add(slot)
        self._track(slot)
        if slot.lease is not None:
            assert self._shared is not None
            try:
                await self._shared.reserve([slot.lease])
            except AgentPoolExhaustedError:
                self._release(slot)
                return None
            except BaseException:
                self._release(slot)
                raise
        return slot

    async def _reserve_shared(self, slots: Sequence[Slot]) -> None:
        """Take the shared leases of slots reserved locally, all or none (reject mode)."""
        leases = [s.lease for s in slots if s.lease is not None]
        if leases:
            assert self._shared is not None
            await self._shared.reserve(leases)

    def _release(self, slot: Slot) -> None:
        """Give a slot back (and its shared lease); a no-op if it was already given back
        (e.g. by reset)."""
        if slot.extra:
            if slot not in self._extra:
                return
            self._extra.discard(slot)
        elif self._active.get(slot.agent_id) is slot:
            del self._active[slot.agent_id]
        else:
            return
        self.limiter.release_on_behalf_of(slot)
        if slot.lease is not None:
            assert self._shared is not None
            self._untrack(slot.lease)
            self._shared.release(slot.lease)

    def _track(self, slot: Slot) -> None:
        """Note a slot's lease; with the first, start listening for lost leases."""
        if slot.lease is None:
            return
        if not self._leased and self._notifier is not None:
            self._stop_listening = self._notifier.on_lease_lost(self._lease_lost)
        self._leased[slot.lease] = slot

    def _untrack(self, lease: str) -> None:
        if self._leased.pop(lease, None) is not None and not self._leased:
            stop, self._stop_listening = self._stop_listening, None
            if stop is not None:
                stop()

    def _lease_lost(self, lease: str, why: str) -> None:
        """The shared capacity lost a lease: stop the work its slot admitted."""
        slot = self._leased.get(lease)
        if slot is not None:
            log.warning(
                "shared lease lost; its work is stopped",
                extra={"agent_id": slot.agent_id, "hedge": slot.extra},
            )
            slot.lose(why)


class Admission:
    """One batch's admission to an :class:`AgentPool` (from :meth:`AgentPool.admit`).

    It owns what the batch holds: the slots taken at admission (:attr:`slots`, reject
    mode), the slots taken later (:meth:`take_slot`, queue mode) and the claims of ids
    still waiting.  :meth:`release` gives one slot back as soon as its agent is done;
    leaving the ``with`` block gives back everything still held.  A slot goes back to
    the pool once: the pool recognises a slot it already has back (released, or taken
    back by :meth:`AgentPool.reset`), so leaving the block passes over those.
    """

    __slots__ = ("_ahead", "_claimed", "_pool", "_shared_taken", "_taken", "slots")

    def __init__(self, pool: AgentPool, claimed: list[str], slots: list[Slot]) -> None:
        self._pool = pool
        self._claimed = claimed
        # Slots taken after admission (queue mode, hedges); no per-slot bookkeeping on
        # release: it is the hot path, and the pool knows what it has back.
        self._taken: list[Slot] = []
        # Slots taken by take_ahead that take_slot has not handed out yet, by id.
        self._ahead: dict[str, Slot] = {}
        #: The slots taken at admission, in the order of the ids (reject mode).
        self.slots: tuple[Slot, ...] = tuple(slots)
        self._shared_taken = False

    async def reserve_shared(self) -> None:
        """Take the shared leases of :attr:`slots`, all or none (a no-op without a shared
        capacity, or once done).  If that fails, everything is given back at once and
        :class:`AgentPoolExhaustedError` (or the cancellation) goes up."""
        if self._shared_taken:
            return
        try:
            await self._pool._reserve_shared(self.slots)
        except BaseException:
            self._give_back()
            raise
        self._shared_taken = True

    async def __aenter__(self) -> Admission:
        await self.reserve_shared()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._give_back()

    def _give_back(self) -> None:
        release = self._pool._release
        for slot in self.slots:
            release(slot)
        for slot in self._taken:
            release(slot)
        self._taken.clear()
        for slot in self._ahead.values():
            release(slot)
        self._ahead.clear()
        self._pool._queued.difference_update(self._claimed)

    async def take_ahead(self, agent_ids: Sequence[str]) -> int:
        """Queue mode: take the slots free now for the first of these claimed ids, in
        order, and (with a shared capacity that is a :class:`~kernel.BatchAcquirer`) ask
        for all their shared leases in one call, granted or queued FIFO.  Returns how many;
        :meth:`take_slot` of each then waits only for its lease's grant.  Without such a
        capacity it takes nothing (0): each id's :meth:`take_slot` does it all.  Raises
        :class:`AgentPoolExhaustedError` (the capacity is unreachable) having taken none.
        """
        slots = await self._pool._take_ahead(agent_ids)
        for slot in slots:
            self._ahead[slot.agent_id] = slot
        return len(slots)

    async def take_slot(self, agent_id: str) -> Slot:
        """Wait for the slot of an id this admission claimed (queue mode)."""
        slot = self._ahead.pop(agent_id, None)
        if slot is None:
            slot = await self._pool._take_slot(agent_id)
        else:
            await self._pool._claim(slot)
        self._taken.append(slot)
        return slot

    async def take_extra_slot(self, agent_id: str) -> Slot | None:
        """A second slot for an agent of this admission that is running (a hedge call).

        Only if a slot is free right now and no one is waiting for one (and, with a
        shared capacity, the cluster has room); else None.
        """
        slot = await self._pool._take_extra_slot(agent_id)
        if slot is not None:
            self._taken.append(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """Give one slot back now (its agent or call is done); later calls are no-ops."""
        self._pool._release(slot)
