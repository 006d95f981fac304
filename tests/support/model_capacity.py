"""The SharedCapacity contract in memory (the Valkey adapter has its own tests against a real
server)."""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import trio
import trio.testing

from kernel import (
    AgentPoolExhaustedError,
)


class ModelCapacity:
    """The SharedCapacity contract in memory: all-or-nothing reserve, FIFO acquire,
    non-blocking release; ``down`` makes it unreachable."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self.held: set[str] = set()
        self.waiting: collections.OrderedDict[str, trio.Event] = collections.OrderedDict()
        self.down = False
        self.max_held = 0
        self.listeners: list[Callable[[str, str], None]] = []
        self.taken: list[str] = []  # every lease ever held, in order

    @property
    def capacity(self) -> int:
        return self._capacity

    def in_use(self) -> int | None:
        return None if self.down else len(self.held)

    def _take(self, lease: str) -> None:
        self.held.add(lease)
        self.taken.append(lease)
        self.max_held = max(self.max_held, len(self.held))

    async def reserve(self, leases: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise AgentPoolExhaustedError("FR10: shared capacity unreachable")
        if self.waiting or len(self.held) + len(leases) > self._capacity:
            raise AgentPoolExhaustedError(
                f"FR10: shared capacity exhausted: {len(self.held)} + {len(leases)} "
                f"> {self._capacity}"
            )
        for lease in leases:
            self._take(lease)

    async def acquire(self, lease: str) -> None:
        if self.down:
            raise AgentPoolExhaustedError("FR10: shared capacity unreachable")
        if not self.waiting and len(self.held) < self._capacity:
            self._take(lease)
            await trio.lowlevel.checkpoint()
            return
        self.waiting[lease] = event = trio.Event()
        try:
            await event.wait()
        except BaseException:
            if self.waiting.pop(lease, None) is None:  # granted in the same instant
                self.release(lease)
            raise

    def on_lease_lost(self, listener: Callable[[str, str], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        return lambda: self.listeners.remove(listener)

    def lose(self, lease: str) -> None:
        """The store can no longer vouch for ``lease``: it is dropped, its holder told."""
        self.held.discard(lease)
        for listener in list(self.listeners):
            listener(lease, "not renewed within lease_s")

    def release(self, lease: str) -> None:
        self.waiting.pop(lease, None)
        self.held.discard(lease)
        while self.waiting and len(self.held) < self._capacity:
            first, event = self.waiting.popitem(last=False)
            self._take(first)
            event.set()


class BatchModelCapacity(ModelCapacity):
    """The model that is also a BatchAcquirer: ``acquire_batch`` grants in order while a
    slot is free and nobody waits, queues the rest; ``acquire`` of each completes it."""

    def __init__(self, capacity: int) -> None:
        super().__init__(capacity)
        self.batched: set[str] = set()
        self.batch_calls = 0

    async def acquire_batch(self, leases: Sequence[str]) -> None:
        await trio.lowlevel.checkpoint()
        if self.down:
            raise AgentPoolExhaustedError("FR10: shared capacity unreachable")
        self.batch_calls += 1
        for lease in leases:
            if not self.waiting and len(self.held) < self._capacity:
                self._take(lease)
            else:
                self.waiting[lease] = trio.Event()
        self.batched.update(leases)

    async def acquire(self, lease: str) -> None:
        if lease not in self.batched:
            await super().acquire(lease)
            return
        self.batched.discard(lease)
        event = self.waiting.get(lease)
        if event is None:  # granted by the batch call (or lost since)
            await trio.lowlevel.checkpoint()
            return
        try:
            await event.wait()
        except BaseException:
            if self.waiting.pop(lease, None) is None:
                self.release(lease)
            raise

    def release(self, lease: str) -> None:
        self.batched.discard(lease)
        super().release(lease)
