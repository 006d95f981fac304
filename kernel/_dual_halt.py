"""CT-11 with two channels: halted if either says so (fail-safe)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, Literal

import trio

from kernel._errors import InvalidRequestError
from kernel._halt import DEFAULT_HALT_READ_TIMEOUT, check_sync_hooks, read_halt, wait_for_halt
from kernel._ports import HaltChecker, HaltControl, HaltNotifier, HaltProbe, HaltWaiter
from kernel.validate import check_seconds

__all__ = ["DualChannelHaltChecker"]

log = logging.getLogger("kernel.halt")

_Channel = Literal["primary", "secondary"]
_BOTH_FAILED = "both halt channels are unreadable; treated as halted"


class _Failed:
    """The answer of a channel whose read raised."""


_FAILED: Final = _Failed()
#: One channel's answer: its halt reason, None (not halted), or _FAILED.
_Read = str | None | _Failed


class DualChannelHaltChecker:
    """Two halt channels read as one, the way a safety interlock is wired.

    * halted if **either** channel says halted; the channels are read concurrently, so
      the answer comes as soon as one says halted, and a slow channel never delays the
      other;
    * a read that does not answer within ``read_timeout`` seconds counts as halted
      (a hung channel is never taken for a clear one);
    * the reason comes from the primary when both are halted (and answered);
    * a channel whose read raises is logged and counted (:attr:`read_errors`), and the
      other channel decides; if **both** raise, the system counts as halted;
    * :meth:`wait_halted` returns as soon as either channel halts (a channel without
      ``wait_halted`` is polled every ``poll_interval`` seconds);
    * :meth:`halted_now` is true if either channel's synchronous probe says halted, and
      :meth:`on_halt` listens to every channel that can call back.

    Typical wiring: an in-process :class:`~kernel.HaltSwitch` as primary (Ctrl-C, an
    operator API) and a durable, cross-process channel as secondary (a file, a database
    row) that survives restarts.
    """

    def __init__(
        self,
        primary: HaltChecker,
        secondary: HaltChecker,
        *,
        poll_interval: float = 0.05,
        read_timeout: float = DEFAULT_HALT_READ_TIMEOUT,
    ) -> None:
        for name, channel in (("primary", primary), ("secondary", secondary)):
            if not isinstance(channel, HaltChecker):
                raise InvalidRequestError(
                    f"{name} must have async is_halted() and get_halt_reason(), "
                    f"got {type(channel).__name__}"
                )
            check_sync_hooks(channel, name)
        self.primary = primary
        self.secondary = secondary
        self.poll_interval = check_seconds(poll_interval, "poll_interval")
        self.read_timeout = check_seconds(read_timeout, "read_timeout")
        self.read_errors: dict[_Channel, int] = {"primary": 0, "secondary": 0}
        # What each channel can do, decided once: a runtime Protocol check costs
        # microseconds, and halted_now() is asked twice per agent.
        channels: tuple[tuple[_Channel, HaltChecker], ...] = (
            ("primary", primary),
            ("secondary", secondary),
        )
        self._probes: list[tuple[_Channel, Callable[[], bool]]] = [
            (which, channel.halted_now)
            for which, channel in channels
            if isinstance(channel, HaltProbe)
        ]
        self._waits = {
            "primary": isinstance(primary, HaltWaiter),
            "secondary": isinstance(secondary, HaltWaiter),
        }

    def __repr__(self) -> str:
        return f"<DualChannelHaltChecker {self.primary!r} | {self.secondary!r}>"

    def _channel(self, which: _Channel) -> HaltChecker:
        return self.primary if which == "primary" else self.secondary

    # ------------------------------------------------------------ reading

    async def _read(self, which: _Channel) -> _Read:
        """One bounded read of one channel: its reason, None if clear, _FAILED if it raised."""
        try:
            return await read_halt(self._channel(which), self.read_timeout)
        except Exception as exc:
            self._read_failed(which, exc)
            return _FAILED

    def _read_failed(self, which: _Channel, exc: Exception) -> None:
        self.read_errors[which] += 1
        log.error(
            "halt channel read failed",
            extra={"halt_channel": which, "error_type": type(exc).__name__},
        )

    async def _read_both(self, *, first_halt_wins: bool) -> dict[_Channel, _Read]:
        """Read both channels concurrently.

        With ``first_halt_wins`` the other read is abandoned as soon as one channel says
        halted (what a halt check needs); otherwise both answers are awaited.
        """
        answers: dict[_Channel, _Read] = {}
        async with trio.open_nursery() as nursery:

            async def read(which: _Channel) -> None:
                answers[which] = answer = await self._read(which)
                if first_halt_wins and isinstance(answer, str):
                    nursery.cancel_scope.cancel()

            nursery.start_soon(read, "primary")
            nursery.start_soon(read, "secondary")
        return answers

    async def _reason(self) -> str | None:
        answers = await self._read_both(first_halt_wins=True)
        for which in ("primary", "secondary"):
            answer = answers.get(which)
            if isinstance(answer, str):
                return answer
        if answers["primary"] is _FAILED and answers["secondary"] is _FAILED:
            return _BOTH_FAILED
        return None

    async def is_halted(self) -> bool:
        return (await self._reason()) is not None

    async def get_halt_reason(self) -> str | None:
        return await self._reason()

    def halted_now(self) -> bool:
        """Synchronous fast path: True if a channel can say, without I/O, that it is halted.

        A channel whose probe raises is counted in :attr:`read_errors` and is "not
        known" here, as a read that raises lets the other channel decide.
        """
        for which, probe in self._probes:
            try:
                if probe():
                    return True
            except Exception as exc:
                self._read_failed(which, exc)
        return False

    def on_halt(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Listen to every channel that can call back (see :class:`~kernel.HaltNotifier`)."""
        unregister = [
            channel.on_halt(listener)
            for channel in (self.primary, self.secondary)
            if isinstance(channel, HaltNotifier)
        ]

        def unregister_all() -> None:
            for call in unregister:
                call()

        return unregister_all

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
        try:
            reason = await wait_for_halt(
                self._channel(which),
                self.poll_interval,
                self.read_timeout,
                waits=self._waits[which],
            )
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
        answers = await self._read_both(first_halt_wins=False)
        primary, secondary = answers["primary"], answers["secondary"]
        return (
            primary is not _FAILED
            and secondary is not _FAILED
            and isinstance(primary, str) == isinstance(secondary, str)
        )

    async def resolve_conflict(self) -> bool:
        """Raise the halt on the lagging channel, if they disagree and it can be halted.

        Returns True if the channels agree afterwards.  Never *clears* a halt: a
        disagreement is resolved towards halted (fail-safe).  A channel is halted through
        :class:`~kernel.HaltControl` (``ahalt``); one that is not a HaltControl is left
        as it is.
        """
        answers = await self._read_both(first_halt_wins=False)
        primary, secondary = answers["primary"], answers["secondary"]
        if primary is _FAILED or secondary is _FAILED:
            return False
        if isinstance(primary, str) == isinstance(secondary, str):
            return True
        reason, lagging, name = (
            (primary, self.secondary, "secondary")
            if isinstance(primary, str)
            else (secondary, self.primary, "primary")
        )
        if not isinstance(lagging, HaltControl):
            log.warning(
                "halt channels disagree; lagging channel cannot be halted",
                extra={"halt_channel": name},
            )
            return False
        await lagging.ahalt(f"propagated: {reason}")
        log.warning("halt propagated to lagging channel", extra={"halt_channel": name})
        return await self.check_channels_consistent()
