"""A durable, cross-process halt channel: a small JSON file.

Any process that can write the file can halt every deliberation that reads it, and the
halt survives restarts (it is sticky until cleared by two approvers).  Writes are atomic
(temp file, fsync, rename, fsync of the directory) and serialized across processes with
an advisory lock, so two processes halting at once keep the first reason and lose no
history.  A file that exists but cannot be read or parsed counts as **halted**
(fail-safe), with a log line that says why.  Reads run in a worker thread, so polling
never blocks the trio loop; ``halt``/``clear`` write at once, like ``HaltSwitch``'s, and
``ahalt``/``aclear`` write from a worker thread.

File format::

    {"halted": true, "reason": "...", "updated_at": "2026-...Z",
     "history": [{"action": "halt", "reason": "...", "at": "...", "approvers": []}, ...]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Collection, Generator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import trio

from adapters._atomic import write_atomically
from kernel import NO_REASON, HaltRecord, check_clear_approvers, check_halt_reason, utc_now
from kernel.validate import check_seconds

__all__ = ["Completed", "FileHaltChannel", "HaltFileState", "HaltResult"]

log = logging.getLogger("adapters.file_halt")

_SCHEMA = "conclave.halt/1"


class HaltResult(int):
    """The bool a synchronous :meth:`FileHaltChannel.halt` returns, awaitable as well.

    ``bool(result)`` and ``await result`` both say whether this call raised the halt.
    """

    def __await__(self) -> Generator[Any, None, bool]:
        return bool(self)
        yield  # type: ignore[unreachable]  # makes this a generator that finishes at once

    def __repr__(self) -> str:
        return repr(bool(self))


class Completed:
    """What a synchronous :meth:`FileHaltChannel.clear` returns: awaitable, to nothing."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, None, None]:
        return None
        yield  # makes this a generator that finishes at once


class HaltFileState:
    """What the file says: halted or not, why, and its history (or why it is unreadable)."""

    __slots__ = ("error", "halted", "history", "reason")

    def __init__(
        self,
        halted: bool,
        reason: str | None,
        history: tuple[HaltRecord, ...] = (),
        error: str | None = None,
    ) -> None:
        self.halted = halted
        self.reason = reason
        self.history = history
        self.error = error

    def __repr__(self) -> str:
        return f"HaltFileState(halted={self.halted}, reason={self.reason!r}, error={self.error!r})"


class FileHaltChannel:
    """A :class:`~kernel.HaltChecker` (with ``wait_halted``) backed by a JSON file.

    Reads (``is_halted``, ``get_halt_reason``, ``wait_halted``) run in a worker thread.
    ``halt`` and ``clear`` are synchronous like ``HaltSwitch``'s (and awaitable);
    ``ahalt`` and ``aclear`` write from a worker thread.  A missing file means "not
    halted"; a missing *directory* is created on the first write.  ``poll_interval`` is
    how often ``wait_halted`` re-reads the file.
    """

    def __init__(self, path: str | os.PathLike[str], poll_interval: float = 0.05) -> None:
        self.path = Path(path)
        self.poll_interval = check_seconds(poll_interval, "poll_interval")
        self._last_error: str | None = None

    def __repr__(self) -> str:
        return f"<FileHaltChannel {str(self.path)!r}>"

    # ------------------------------------------------------------ reading

    def read_state(self) -> HaltFileState:
        """Read the file now (blocking; use from a thread or outside trio)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return self._ok(HaltFileState(False, None))
        except OSError as exc:
            return self._unreadable(f"cannot read {self.path}: {exc.strerror or exc}")
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("halted"), bool):
                raise ValueError("no boolean 'halted' field")
            reason = doc.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise ValueError("'reason' is not a string")
            history = tuple(_record(r) for r in doc.get("history", []))
        except (ValueError, TypeError, KeyError) as exc:
            return self._unreadable(f"corrupt halt file {self.path}: {exc}")
        return self._ok(HaltFileState(doc["halted"], reason if doc["halted"] else None, history))

    def _ok(self, state: HaltFileState) -> HaltFileState:
        if self._last_error is not None:
            log.warning("halt file readable again", extra={"halt_file": str(self.path)})
            self._last_error = None
        return state

    def _unreadable(self, why: str) -> HaltFileState:
        if why != self._last_error:  # log each new problem once, not on every poll
            log.error(
                "halt file unreadable; treated as halted",
                extra={"halt_file": str(self.path), "problem": why},
            )
            self._last_error = why
        return HaltFileState(True, f"halt file unreadable ({why}); treated as halted", error=why)

    async def state(self) -> HaltFileState:
        return await trio.to_thread.run_sync(self.read_state)

    async def is_halted(self) -> bool:
        return (await self.state()).halted

    async def get_halt_reason(self) -> str | None:
        return (await self.state()).reason

    async def wait_halted(self) -> str:
        while True:
            state = await self.state()
            if state.halted:
                return state.reason or NO_REASON
            await trio.sleep(self.poll_interval)

    @property
    def history(self) -> tuple[HaltRecord, ...]:
        return self.read_state().history

    # ------------------------------------------------------------ writing

    def halt(self, reason: str) -> HaltResult:
        """Raise the halt now; true only if this call raised it (the first reason is kept).

        Synchronous, like :meth:`HaltSwitch.halt <kernel.HaltSwitch.halt>`: the file is
        written (and fsynced) before it returns, which takes a few milliseconds.  The
        result may also be awaited (``await channel.halt(...)`` gives the same bool), so
        code that treats every halt channel as async works unchanged.  From a trio task
        that must not block even that long, use :meth:`ahalt`.
        """
        return HaltResult(self._halt_now(check_halt_reason(reason)))

    def clear(self, *, approvers: Collection[str], reason: str) -> Completed:
        """Clear the halt now: two distinct approvers and a reason, as for ``HaltSwitch``.

        Synchronous, and awaitable like :meth:`halt`; :meth:`aclear` runs in a thread.
        """
        names = check_clear_approvers(approvers, reason)
        self._clear_now(names, reason)
        return Completed()

    async def ahalt(self, reason: str) -> bool:
        """:meth:`halt`, with the disk write in a worker thread."""
        return await trio.to_thread.run_sync(self._halt_now, check_halt_reason(reason))

    async def aclear(self, *, approvers: Collection[str], reason: str) -> None:
        """:meth:`clear`, with the disk write in a worker thread."""
        names = check_clear_approvers(approvers, reason)
        await trio.to_thread.run_sync(self._clear_now, names, reason)

    def _halt_now(self, reason: str) -> bool:
        with self._locked():
            state = self.read_state()
            if state.halted and state.error is None:
                return False
            # A corrupt file is replaced by a good one that says halted: still halted,
            # now with a reason an operator can read.
            history = [*state.history, HaltRecord("halt", reason, utc_now())]
            self._write(True, reason, history)
        log.critical(
            "halt raised",
            extra={"halt_channel": "file", "halt_file": str(self.path), "halt_reason": reason},
        )
        return True

    def _clear_now(self, approvers: tuple[str, ...], reason: str) -> None:
        with self._locked():
            state = self.read_state()
            if not state.halted:
                return
            history = [*state.history, HaltRecord("clear", reason, utc_now(), approvers)]
            self._write(False, None, history)
        log.warning(
            "halt cleared",
            extra={
                "halt_channel": "file",
                "halt_file": str(self.path),
                "approvers": list(approvers),
            },
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An advisory lock on a sibling file, so read-modify-write is one step."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as lock:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)

    def _write(self, halted: bool, reason: str | None, history: list[HaltRecord]) -> None:
        doc = {
            "schema": _SCHEMA,
            "halted": halted,
            "reason": reason,
            "updated_at": utc_now().isoformat(),
            "history": [
                {
                    "action": r.action,
                    "reason": r.reason,
                    "at": r.at.isoformat(),
                    "approvers": list(r.approvers),
                }
                for r in history
            ],
        }
        write_atomically(self.path, (json.dumps(doc, indent=2) + "\n").encode())


def _record(raw: Any) -> HaltRecord:
    if not isinstance(raw, dict) or raw.get("action") not in ("halt", "clear"):
        raise ValueError("bad history record")
    return HaltRecord(
        raw["action"],
        str(raw["reason"]),
        datetime.fromisoformat(raw["at"]),
        tuple(str(a) for a in raw.get("approvers", [])),
    )
