"""CT-11 halt: the in-process switch, and the shape every halt channel has."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Collection, Sequence

import trio

from kernel._errors import HaltClearDeniedError, InvalidRequestError
from kernel._ports import HaltChecker, HaltRecord, HaltWaiter
from kernel._types import utc_now

__all__ = [
    "DEFAULT_HALT_READ_TIMEOUT",
    "NO_REASON",
    "HaltRecord",
    "HaltSwitch",
    "check_clear_approvers",
    "check_halt_reason",
    "check_sync_hooks",
    "read_halt",
    "unanswered_reason",
    "wait_for_halt",
]

log = logging.getLogger("kernel.halt")


#: The reason reported for a channel that says halted without saying why.
NO_REASON = "halted (no reason given)"


def check_halt_reason(reason: object) -> str:
    """A halt needs a non-empty reason: the history must say why."""
    if not isinstance(reason, str) or not reason.strip():
        raise InvalidRequestError("CT-11: a halt needs a non-empty reason")
    return reason


#: How long a halt channel may take to answer one read before it counts as halted.
DEFAULT_HALT_READ_TIMEOUT = 2.0


def unanswered_reason(read_timeout: float) -> str:
    """The halt reason of a channel that did not answer a read in time."""
    return f"halt channel did not answer within {read_timeout:g} s; treated as halted"


async def read_halt(checker: HaltChecker, read_timeout: float) -> str | None:
    """One read of ``checker``: its reason if halted, None if not.

    A read that does not answer within ``read_timeout`` seconds counts as halted (a hung
    channel must never keep a halt from being seen), with a reason that says so.  So does
    an answer that is not a ``bool``.  The reason returned is always a non-empty ``str``
    (:data:`NO_REASON` if the channel gave none, or not text).  Errors from
    ``is_halted`` propagate: what a failed read means (halted, or "ask the other
    channel") is the caller's decision; once it said halted, an error reading the reason
    is only a reason that says so.
    """
    with trio.move_on_after(read_timeout):
        # Typed as the protocol says, but a channel is only trusted as far as it behaves.
        halted: object = await checker.is_halted()
        if halted is False:
            return None
        if halted is not True:
            # Garbage is doubt, and doubt is a halt: a forgotten ``return`` (None) must
            # not read as "clear".
            log.error("halt channel answered a non-bool", extra={"answer_type": _kind(halted)})
            if inspect.iscoroutine(halted):
                halted.close()
            return f"halt channel answered {_kind(halted)}, not a bool; treated as halted"
        try:
            return _text_reason(await checker.get_halt_reason())
        except Exception as exc:
            # It said halted: a reason that cannot be read must not undo that (a failed
            # read may "let the other channel decide", a halt may not).
            log.error("halt reason unreadable", extra={"error_type": type(exc).__name__})
            return f"halted (reason unreadable: {type(exc).__name__})"
    log.error("halt channel read timed out", extra={"read_timeout_s": read_timeout})
    return unanswered_reason(read_timeout)


def _kind(value: object) -> str:
    return "None" if value is None else type(value).__name__


def _text_reason(reason: object) -> str:
    """A halted channel's reason as text: anything but a non-empty ``str`` is NO_REASON.

    Callers (the dual checker, the service) tell "halted" from "clear" by a ``str``
    reason, so a reason of another type must never reach them as it is.
    """
    return reason if isinstance(reason, str) and reason.strip() else NO_REASON


def check_sync_hooks(channel: object, name: str) -> None:
    """Refuse a channel whose ``halted_now`` or ``on_halt`` is an ``async def``.

    Both are called synchronously (:class:`~kernel.HaltProbe`,
    :class:`~kernel.HaltNotifier`): an async probe's coroutine is always truthy (every
    batch would halt, with no reason), and an async ``on_halt`` never registers.
    """
    for hook in ("halted_now", "on_halt"):
        if inspect.iscoroutinefunction(getattr(channel, hook, None)):
            raise InvalidRequestError(
                f"{name}.{hook} must be a plain (synchronous) method, not async def"
            )


async def wait_for_halt(
    checker: HaltChecker,
    poll_interval: float,
    read_timeout: float = DEFAULT_HALT_READ_TIMEOUT,
    *,
    waits: bool | None = None,
) -> str:
    """Return the reason once ``checker`` is halted.

    A :class:`HaltWaiter` is waited on; any other checker is polled every
    ``poll_interval`` seconds, each read bounded by ``read_timeout`` (see
    :func:`read_halt`).  Errors from the checker propagate.  ``waits`` says whether the
    checker is a :class:`HaltWaiter` when the caller already knows (the runtime Protocol
    check costs microseconds; a service asks once, not per batch).
    """
    if waits is None:
        waits = isinstance(checker, HaltWaiter)
    if waits:
        return _text_reason(await checker.wait_halted())  # type: ignore[attr-defined]
    while True:
        reason = await read_halt(checker, read_timeout)
        if reason is not None:
            return reason
        # Nothing to wait on: polling is the contract of such a checker.
        await trio.sleep(poll_interval)


def check_clear_approvers(approvers: Collection[str], reason: str) -> tuple[str, ...]:
    """Validate a clear request; returns the distinct approvers, sorted.

    A halt is cleared by at least two distinct, non-empty approvers (two-person rule),
    and with a reason, so the history says who decided and why.
    """
    if isinstance(approvers, str | bytes):
        raise HaltClearDeniedError("CT-11: approvers must be a collection of names, not a string")
    names = {a.strip() for a in approvers if isinstance(a, str) and a.strip()}
    if len(names) < 2:
        raise HaltClearDeniedError(
            f"CT-11: clearing a halt needs at least 2 distinct approvers, got {len(names)}"
        )
    if not isinstance(reason, str) or not reason.strip():
        raise HaltClearDeniedError("CT-11: clearing a halt needs a non-empty reason")
    return tuple(sorted(names))


class HaltSwitch:
    """A sticky, in-process halt: once raised it stays raised until cleared by two people.

    Implements :class:`~kernel.HaltChecker` including ``wait_halted``, so a running batch
    reacts to :meth:`halt` at once rather than on a poll, and :class:`~kernel.HaltControl`
    (``ahalt``, ``aclear``, ``ahistory``: the synchronous calls, awaitable).  The first reason wins;
    later :meth:`halt` calls return False and change nothing.

    :meth:`halt` is synchronous and safe to call from any trio task (including an
    agent's own task) or from a signal handler running in the trio thread.  From
    another thread, use ``trio.from_thread.run_sync(switch.halt, reason)``.
    """

    def __init__(self) -> None:
        self._reason: str | None = None
        self._event = trio.Event()
        self._history: list[HaltRecord] = []
        self._listeners: list[Callable[[str], None]] = []

    def __repr__(self) -> str:
        return f"<HaltSwitch halted={self.halted}>"

    @property
    def halted(self) -> bool:
        return self._reason is not None

    def halted_now(self) -> bool:
        """The synchronous probe the service checks just before starting an agent."""
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    @property
    def history(self) -> tuple[HaltRecord, ...]:
        return tuple(self._history)

    def halt(self, reason: str) -> bool:
        """Raise the halt.  True only for the call that raised it; idempotent after."""
        check_halt_reason(reason)
        if self._reason is not None:
            return False
        self._reason = reason
        self._history.append(HaltRecord("halt", reason, utc_now()))
        self._event.set()
        log.critical("halt raised", extra={"halt_channel": "switch", "halt_reason": reason})
        for listener in list(self._listeners):
            try:
                listener(reason)
            except Exception:
                # One broken listener must not keep the halt from the others.
                log.exception("halt listener raised; ignored", extra={"halt_channel": "switch"})
        return True

    def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call ``listener(reason)`` from inside :meth:`halt`; returns the unregister call.

        The listener runs before :meth:`halt` returns, in the caller's task: it must be
        quick and must not block (the service's only cancels a scope).
        """
        self._listeners.append(listener)

        def unregister() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unregister

    def clear(self, *, approvers: Collection[str], reason: str) -> bool:
        """Clear the halt (two distinct approvers and a reason); True if a halt was
        cleared, False (and no record) if the switch was not halted.

        Raises :class:`HaltClearDeniedError` and changes nothing if the approvers or the
        reason do not qualify.  After a clear the switch can be halted again.
        """
        names = check_clear_approvers(approvers, reason)
        if self._reason is None:
            return False
        self._reason = None
        self._event = trio.Event()
        self._history.append(HaltRecord("clear", reason, utc_now(), names))
        log.warning("halt cleared", extra={"halt_channel": "switch", "approvers": list(names)})
        return True

    # HaltControl: the synchronous calls, then a schedule point that cannot be
    # cancelled (a halt that was asked for happens, and its answer is not lost).

    async def ahalt(self, reason: str) -> bool:
        raised = self.halt(reason)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return raised

    async def aclear(
        self, *, approvers: Collection[str] = (), reason: str, approvals: Sequence[str] = ()
    ) -> bool:
        if approvals:
            # In one process, the people at the keyboard are the approvers: there is no
            # allowed-signers file to verify a signature against.
            raise HaltClearDeniedError(
                "CT-11: HaltSwitch is cleared by approver names, not signed approvals"
            )
        cleared = self.clear(approvers=approvers, reason=reason)
        await trio.lowlevel.cancel_shielded_checkpoint()
        return cleared

    async def ahistory(self) -> tuple[HaltRecord, ...]:
        await trio.lowlevel.checkpoint()
        return self.history

    # HaltChecker
    async def is_halted(self) -> bool:
        return self.halted

    async def get_halt_reason(self) -> str | None:
        return self._reason

    async def wait_halted(self) -> str:
        """Return the reason as soon as the switch is halted (at once if it already is)."""
        while True:
            event = self._event
            if self._reason is not None:
                await trio.lowlevel.checkpoint()
                return self._reason
            await event.wait()
