"""CT-11 with two channels: halted if either says so (fail-safe)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import trio

from kernel._errors import InvalidRequestError
from kernel._halt import NO_REASON, wait_for_halt
from kernel._ports import HaltChecker
from kernel._types import check_seconds

__all__ = ["DualChannelHaltChecker"]

log = logging.getLogger("kernel.halt")

_Channel = Literal["primary", "secondary"]
_BOTH_FAILED = "both halt channels are unreadable; treated as halted"


class DualChannelHaltChecker:
    """Two halt channels read as one, the way a safety interlock is wired.

    * halted if **either** channel says halted;
    * the reason comes from the primary when both are halted;
    * a channel whose read raises is logged and counted (:attr:`read_errors`), and the
      other channel decides; if **both** raise, the system counts as halted;
    * :meth:`wait_halted` returns as soon as either channel halts (a channel without
      ``wait_halted`` is polled every ``poll_interval`` seconds).

    Typical wiring: an in-process :class:`~kernel.HaltSwitch` as primary (Ctrl-C, an
    operator API) and a durable, cross-process channel as secondary (a file, a database
    row) that survives restarts.
    """

    def __init__(
        self, primary: HaltChecker, secondary: HaltChecker, *, poll_interval: float = 0.05
    ) -> None:
        for name, channel in (("primary", primary), ("secondary", secondary)):
            if not isinstance(channel, HaltChecker):
                raise InvalidRequestError(
                    f"{name} must have async is_halted() and get_halt_reason(), "
                    f"got {type(channel).__name__}"
                )
        self.primary = primary
        self.secondary = secondary
        self.poll_interval = check_seconds(poll_interval, "poll_interval")
        self.read_errors: dict[_Channel, int] = {"primary": 0, "secondary": 0}

    def __repr__(self) -> str:
        return f"<DualChannelHaltChecker {self.primary!r} | {self.secondary!r}>"

    # ------------------------------------------------------------ reading

    async def _read(self, which: _Channel) -> tuple[bool, str | None] | None:
        """(halted, reason) of one channel, or None if it could not be read."""
        channel = self.primary if which == "primary" else self.secondary
        try:
            halted = await channel.is_halted()
            reason = await channel.get_halt_reason() if halted else None
        except Exception as exc:
            self._read_failed(which, exc)
            return None
        return bool(halted), reason

    def _read_failed(self, which: _Channel, exc: Exception) -> None:
        self.read_errors[which] += 1
        log.error(
            "halt channel read failed",
            extra={"halt_channel": which, "error_type": type(exc).__name__},
        )

    async def _state(self) -> tuple[bool, str | None]:
        primary = await self._read("primary")
        secondary = await self._read("secondary")
        if primary is None and secondary is None:
            return True, _BOTH_FAILED
        for state in (primary, secondary):
            if state is not None and state[0]:
                return True, state[1] or NO_REASON
        return False, None

    async def is_halted(self) -> bool:
        return (await self._state())[0]

    async def get_halt_reason(self) -> str | None:
        return (await self._state())[1]

    def halted_now(self) -> bool:
        """Synchronous fast path: True if a channel can say, without I/O, that it is halted."""
        for channel in (self.primary, self.secondary):
            probe = getattr(channel, "halted_now", None)
            if callable(probe) and probe():
                return True
        return False

    async def wait_halted(self) -> str:
        """Return a reason as soon as either channel halts (or both become unreadable)."""
        found: list[str] = []
        failed: set[_Channel] = set()

        async with trio.open_nursery() as nursery:

            def done(reason: str) -> None:
                found.append(reason)
                nursery.cancel_scope.cancel()

            for which in ("primary", "secondary"):
                nursery.start_soon(self._wait_one, which, done, failed)
        if found:
            return found[0]
        return _BOTH_FAILED

    async def _wait_one(
        self, which: _Channel, done: Callable[[str], None], failed: set[_Channel]
    ) -> None:
        channel = self.primary if which == "primary" else self.secondary
        try:
            reason = await wait_for_halt(channel, self.poll_interval)
        except Exception as exc:
            self._read_failed(which, exc)
            failed.add(which)
            if len(failed) == 2:
                done(_BOTH_FAILED)
            return
        done(reason)

    # ------------------------------------------------------------ consistency

    async def check_channels_consistent(self) -> bool:
        """True if both channels are readable and agree (both halted or both not)."""
        primary = await self._read("primary")
        secondary = await self._read("secondary")
        return primary is not None and secondary is not None and primary[0] == secondary[0]

    async def resolve_conflict(self) -> bool:
        """Raise the halt on the lagging channel, if they disagree and it can be halted.

        Returns True if the channels agree afterwards.  Never *clears* a halt: a
        disagreement is resolved towards halted (fail-safe).  A channel is halted through
        its ``halt(reason)`` method, sync or async; one without it is left as it is.
        """
        primary = await self._read("primary")
        secondary = await self._read("secondary")
        if primary is None or secondary is None:
            return False
        if primary[0] == secondary[0]:
            return True
        halted_state, lagging, name = (
            (primary, self.secondary, "secondary")
            if primary[0]
            else (secondary, self.primary, "primary")
        )
        reason = halted_state[1] or NO_REASON
        raise_halt = getattr(lagging, "halt", None)
        if not callable(raise_halt):
            log.warning(
                "halt channels disagree; lagging channel cannot be halted",
                extra={"halt_channel": name},
            )
            return False
        result = raise_halt(f"propagated: {reason}")
        if hasattr(result, "__await__"):
            await result
        log.warning("halt propagated to lagging channel", extra={"halt_channel": name})
        return await self.check_channels_consistent()
