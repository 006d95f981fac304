"""How a service watches its halt channel: what the channel can do, decided once, and
every read fail-safe.

A channel is only trusted as far as it behaves.  A read that raises, hangs past the read
timeout (:func:`~kernel.read_halt`), answers junk, or makes up a ``trio.Cancelled`` is a
halt, with a reason that says so; so is a probe or a listener registration that raises.
Cancellations someone asked for always propagate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from kernel._cancel import raise_if_requested
from kernel._errors import InvalidRequestError
from kernel._halt import check_sync_hooks, read_halt, wait_for_halt
from kernel._ports import HaltChecker, HaltNotifier, HaltProbe, HaltWaiter
from kernel.validate import check_seconds

__all__ = ["HaltWatch", "Probe"]

log = logging.getLogger("kernel.service")

#: What a probe says: False (clear), True (halted; the channel is read for the reason
#: later), or the reason itself (the probe failed, which is a halt).
Probe = bool | str


class HaltWatch:
    """One service's view of its halt channel (``None``: never halted).

    Capabilities are decided here, once (a runtime Protocol check costs microseconds,
    not something to repeat per batch or per agent): a :class:`~kernel.HaltProbe` is
    asked before each start and each release, a :class:`~kernel.HaltNotifier` is
    listened to while a batch runs, a :class:`~kernel.HaltWaiter` is waited on, and any
    other channel is polled every ``poll_interval`` seconds.
    """

    __slots__ = (
        "_on_halt", "_waits", "checker", "halted_now", "poll_interval", "read_timeout",
    )  # fmt: skip

    def __init__(self, checker: object, poll_interval: object, read_timeout: object) -> None:
        if checker is not None and not isinstance(checker, HaltChecker):
            raise InvalidRequestError(
                "halt_checker must have async is_halted() and get_halt_reason(), "
                f"got {type(checker).__name__}"
            )
        check_sync_hooks(checker, "halt_checker")
        self.poll_interval = check_seconds(poll_interval, "halt_poll_interval")
        self.read_timeout = check_seconds(read_timeout, "halt_read_timeout")
        self.checker: HaltChecker | None = checker
        #: The channel's own probe, if it has one (raw: :meth:`probe` is the fail-safe call).
        self.halted_now: Callable[[], bool] | None = (
            checker.halted_now if isinstance(checker, HaltProbe) else None
        )
        self._on_halt: Callable[[Callable[[str], None]], Callable[[], None]] | None = (
            checker.on_halt if isinstance(checker, HaltNotifier) else None
        )
        self._waits = isinstance(checker, HaltWaiter)

    async def read(self) -> str | None:
        """The halt reason if the channel says halted (or fails), else None."""
        checker = self.checker
        if checker is None:
            return None
        try:
            return await read_halt(checker, self.read_timeout)
        except Exception as exc:
            return failed(exc)
        except trio.Cancelled as exc:
            raise_if_requested(exc)
            return failed(exc)  # a channel that made up a cancellation

    async def wait(self) -> str:
        """The halt reason, once the channel says halted (or fails); a channel must be set."""
        assert self.checker is not None
        try:
            return await wait_for_halt(
                self.checker, self.poll_interval, self.read_timeout, waits=self._waits
            )
        except Exception as exc:
            return failed(exc)
        except trio.Cancelled as exc:
            raise_if_requested(exc)
            return failed(exc)  # a stray: it must not end the batch as if done

    def probe(self) -> Probe:
        """Is the channel halted right now?  Synchronous, no checkpoint, no I/O."""
        probe = self.halted_now
        if probe is None:
            return False
        try:
            return bool(probe())
        except Exception as exc:  # a probe that raises is a halt, as a read that raises is
            return failed(exc)

    def listen(self, on_halt: Callable[[str], None]) -> Callable[[], None] | None:
        """Have a channel that can call back call ``on_halt`` from inside its halt();
        what to call to stop listening (None: nothing to stop).  A channel that raises
        here is halted: ``on_halt`` is called with the failure before this returns."""
        if self._on_halt is None:
            return None
        try:
            return self._on_halt(on_halt)
        except Exception as exc:
            on_halt(failed(exc))
            return None


def failed(exc: BaseException) -> str:
    """Fail-safe: a halt channel that cannot be read means the system is halted."""
    log.error(
        "halt checker failed; treating the system as halted",
        extra={"error_type": type(exc).__name__},
    )
    return f"halt checker failed ({type(exc).__name__}); treated as halted"
