"""The kernel's ports: what an orchestrator, a halt channel and a witness must provide.

They are ``typing.Protocol``s, checked structurally; adapters implement them without
importing anything from here but the domain types.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Literal, Protocol, runtime_checkable
from uuid import UUID

import attrs

from kernel._types import AgentOutput, ContextBundle

__all__ = [
    "AgentOrchestratorProtocol",
    "BatchAcquirer",
    "BatchLog",
    "CommitReceipt",
    "HaltChecker",
    "HaltControl",
    "HaltNotifier",
    "HaltProbe",
    "HaltRecord",
    "HaltWaiter",
    "LeaseLossNotifier",
    "OutputWitness",
    "RecordedBatch",
    "SharedCapacity",
]


@runtime_checkable
class AgentOrchestratorProtocol(Protocol):
    """Runs one agent on one context (trio-native).

    Return the agent's :class:`AgentOutput` (``agent_id`` must be the agent asked; the
    kernel stamps ``request_id`` and ``batch_id``), or raise an ``Exception`` that says
    what went wrong.  Must be cancellable: a halt or a timeout cancels the call, and the
    orchestrator must not swallow ``trio.Cancelled``.
    """

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput: ...


@runtime_checkable
class HaltChecker(Protocol):
    """A halt channel the kernel reads.

    A checker that also has ``async wait_halted() -> str`` (see :class:`HaltWaiter`) is
    waited on during a batch; one without it is polled every ``halt_poll_interval``.
    A checker whose read raises is treated as halted (fail-safe).
    """

    async def is_halted(self) -> bool: ...

    async def get_halt_reason(self) -> str | None: ...


@runtime_checkable
class HaltWaiter(HaltChecker, Protocol):
    """A :class:`HaltChecker` that can be waited on: ``wait_halted`` returns the reason."""

    async def wait_halted(self) -> str: ...


@runtime_checkable
class HaltProbe(Protocol):
    """A halt channel that can answer "halted right now?" synchronously, without I/O.

    The service asks it just before each agent starts and before each output is
    released, so that nothing starts and nothing is released after a halt, even in the
    instant before the task watching the channel wakes up.  ``True`` must mean halted;
    ``False`` may only mean "not known to be halted without I/O".
    """

    def halted_now(self) -> bool: ...


@runtime_checkable
class HaltNotifier(Protocol):
    """A halt channel that can call back, synchronously, from inside its own ``halt()``.

    ``on_halt(listener)`` registers ``listener(reason)`` and returns a function that
    unregisters it.  The service listens while a batch runs, so that the batch is
    cancelled before ``halt()`` returns: a commit still in progress at that moment is
    cancelled, and nothing is released after the halt, not even in the same instant.
    """

    def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]: ...


@attrs.frozen(slots=True)
class HaltRecord:
    """One entry of a halt channel's history: a halt raised, or a halt cleared.

    ``approvers`` are who cleared it (or, for a signed halt, who raised it);
    ``fingerprints`` the SSH key fingerprints that signed for them, in the same order
    (empty when the names were only typed).  ``halt_id`` names the halt (durable
    channels give every halt one; a clear names the halt it cleared).
    """

    action: Literal["halt", "clear"]
    reason: str
    at: datetime
    approvers: tuple[str, ...] = ()
    fingerprints: tuple[str, ...] = ()
    halt_id: str | None = None


@runtime_checkable
class HaltControl(Protocol):
    """A halt channel that can be raised, cleared and asked its history, the same way
    whatever it is (in-process, a file, a server): what an operator's tools use.

    * ``ahalt(reason)`` -- raise the halt; True if this call raised it, False if it was
      already raised (the first reason is kept).  A blank reason raises
      :class:`~kernel.InvalidRequestError` and changes nothing; a channel that cannot
      be written raises (``OSError``, or a :class:`~kernel.ConclaveError`).
    * ``aclear(approvers=..., reason=...)`` -- clear it (two distinct approvers and a
      reason, :func:`~kernel.check_clear_approvers`); True if a halt was cleared, False
      if there was none.  ``aclear(approvals=..., reason=...)`` clears with signed
      approvals instead (each the text of an approval file): a durable channel
      configured with an allowed-signers file takes only those, and refuses names.
      Raises :class:`~kernel.HaltClearDeniedError`, having changed nothing, when the
      approvers or approvals do not qualify or the channel cannot be read or reached
      (what cannot be read is not cleared).
    * ``ahistory()`` -- the halts and clears, oldest first; raises a
      :class:`~kernel.ConclaveError` if it cannot be read at all.

    The names carry an ``a`` because :meth:`HaltSwitch.halt <kernel.HaltSwitch.halt>`
    and ``clear`` are synchronous (a signal handler, another thread): the sync names
    stay where they exist.
    """

    async def ahalt(self, reason: str) -> bool: ...

    async def aclear(
        self, *, approvers: Collection[str] = (), reason: str, approvals: Sequence[str] = ()
    ) -> bool: ...

    async def ahistory(self) -> tuple[HaltRecord, ...]: ...


@runtime_checkable
class SharedCapacity(Protocol):
    """A capacity shared by every process (and machine) that uses the same store (FR10
    across replicas).  An :class:`~kernel.AgentPool` given one admits a call only when
    both its own and the shared capacity have room.

    Each slot the pool takes is one *lease*, named by a unique string.

    * ``reserve(leases)`` -- all or nothing: take one slot per lease now, or raise
      :class:`~kernel.AgentPoolExhaustedError` (no room, or the store cannot be reached:
      never over-admit) having taken none.
    * ``acquire(lease)`` -- wait, FIFO across every process, for one slot.  Cancellable:
      cancelled, it holds nothing.  Raises ``AgentPoolExhaustedError`` if the store
      cannot be reached.
    * ``release(lease)`` -- give a slot back, or withdraw a lease still waiting.  Never
      blocks and never raises (it runs in ``finally`` blocks and on cancellation): the
      store is updated in the background, and a process that dies loses its leases when
      they expire.
    * ``capacity`` and ``in_use()``: the shared size, and the last known count in use (or
      None when unknown), for :class:`~kernel.PoolStatus`.
    """

    @property
    def capacity(self) -> int: ...

    async def reserve(self, leases: Sequence[str]) -> None: ...

    async def acquire(self, lease: str) -> None: ...

    def release(self, lease: str) -> None: ...

    def in_use(self) -> int | None: ...


@runtime_checkable
class BatchAcquirer(SharedCapacity, Protocol):
    """A :class:`SharedCapacity` that can start many acquisitions in one call to its store
    (queue mode's admission of a batch costs one round trip, not one per agent).

    ``acquire_batch(leases)`` asks for every lease at once, in order: each is granted now
    if a slot is free and nobody waits, else queued FIFO behind whoever waits (the rest of
    the batch behind it).  It returns once the store has the request; then
    ``acquire(lease)`` of each of those leases completes its acquisition: it returns at
    once for a lease already granted and waits only for the grant of a queued one (no
    further call).  If the store cannot be reached it raises
    :class:`~kernel.AgentPoolExhaustedError` having taken none; cancelled, it holds
    none.  ``release(lease)`` gives back, or withdraws, any of them, acquired or not.
    """

    async def acquire_batch(self, leases: Sequence[str]) -> None: ...


@runtime_checkable
class LeaseLossNotifier(Protocol):
    """A :class:`SharedCapacity` that can say when a lease it granted is *lost*: it can
    no longer vouch that the store counts it (it could not renew it in time, or the store
    lost it and has no room for it again).

    ``on_lease_lost(listener)`` registers ``listener(lease, why)`` and returns a function
    that unregisters it; the listener is quick and never raises.  An
    :class:`~kernel.AgentPool` listens while it holds leases and stops the work on a lost
    one at once (an agent fails with ``ERROR``, "shared capacity lease lost: <why>"; a
    hedge call is dropped), rather than run beyond the cluster's count.
    """

    def on_lease_lost(self, listener: Callable[[str, str], None]) -> Callable[[], None]: ...


@attrs.frozen(slots=True)
class CommitReceipt:
    """Proof that a witness recorded an output before anyone saw it."""

    output_id: UUID
    content_hash: str
    sequence: int
    chain_hash: str
    committed_at: datetime


@runtime_checkable
class OutputWitness(Protocol):
    """Records an output (by hash) before the kernel lets anyone see it (FR9).

    ``commit`` returns once the record is durable; if it raises, the output is not
    released and its agent becomes a ``WITNESS`` failure.  It must be cancellable
    (a halt or the caller's cancel scope): cancelled before the record is durable, it
    must never write that output, now or later, and must let ``trio.Cancelled``
    through promptly, however slow or locked its storage is.  Cancelled after the
    point of no return, it may finish (briefly) and return the receipt: the kernel
    then releases the output, so the log and the caller's result always agree.
    """

    async def commit(self, output: AgentOutput) -> CommitReceipt: ...


@attrs.frozen(slots=True)
class RecordedBatch:
    """What a :class:`BatchLog` holds of one batch.

    ``requests``: each agent's context fingerprint as the batch's first run recorded it
    (None: outputs of the batch are in the log, but no run record).  ``outputs``: the
    outputs committed for the batch, by agent id, exactly as committed.  ``runs``: how
    many runs of the batch were recorded.
    """

    batch_id: UUID
    requests: Mapping[str, str] | None
    outputs: Mapping[str, AgentOutput]
    runs: int


@runtime_checkable
class BatchLog(Protocol):
    """A witness that also records each batch's request set, so that a batch stopped by a
    halt or a crash can be resumed (``invoke_concurrent(..., resume=batch_id)``).

    * ``begin_run(batch_id, requests)`` -- a run of the batch starts, with its request
      set (agent id -> context fingerprint); returns the function that ends it.  Both
      are quick and never block nor raise.  The run is recorded with the first output of
      the batch committed while it lasts, in the same durable write: the log never holds
      an output of a recorded batch without its request set, and a run that committed
      nothing leaves no trace.
    * ``recorded_batch(batch_id)`` -- what the log holds of the batch, or None if
      nothing.  Raises if the log cannot be read, holds a record of the batch that does
      not verify, or two outputs of one agent of one batch (the log must refuse such a
      second commit).  Cancellable without delay.
    """

    def begin_run(self, batch_id: UUID, requests: Mapping[str, str]) -> Callable[[], None]: ...

    async def recorded_batch(self, batch_id: UUID) -> RecordedBatch | None: ...
