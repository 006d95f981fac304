"""Telling the caller's ``on_progress`` how a batch goes, without letting it take the
batch down (its errors are logged and ignored) or hold a halt back."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from uuid import UUID

import trio

from kernel._cancel import raise_if_requested

__all__ = ["Progress", "ProgressCallback"]

log = logging.getLogger("kernel.service")

#: ``on_progress(done, total, agent_id, status)``; status is "completed", "failed"
#: or (sequential mode, before each turn) "starting".
ProgressCallback = Callable[[int, int, str, str], object]


class Progress:
    """One batch's progress reports (a no-op without a callback)."""

    __slots__ = ("_batch_id", "_callback", "_in_turn", "_total", "reports")

    def __init__(
        self, callback: ProgressCallback | None, batch_id: UUID, total: int, in_turn: bool
    ) -> None:
        self._callback = callback
        self._batch_id = batch_id
        self._total = total
        # Sequential mode: an outcome's report is done before the next turn starts.
        self._in_turn = in_turn
        #: Where async reports of outcomes run (set by the batch): outside the scope its
        #: agents run in, so that a quorum reached right after an outcome was recorded
        #: does not cut its report short.  A halt and the batch's deadline do
        #: (:meth:`cancel`): nothing slow between them and the caller.
        self.reports: trio.Nursery | None = None

    def cancel(self) -> None:
        """Cancel the reports still running (a halt, the deadline)."""
        if self.reports is not None:
            self.reports.cancel_scope.cancel()

    async def starting(self, done: int, agent_id: str) -> None:
        """Report a sequential turn about to start, and wait for it if it is async."""
        answer = self._call(done, agent_id, "starting")
        if answer is not None:
            await self._wait(agent_id, answer)

    async def outcome(self, done: int, agent_id: str, completed: bool) -> None:
        """Report an outcome just recorded; an async report runs in :attr:`reports`."""
        answer = self._call(done, agent_id, "completed" if completed else "failed")
        if answer is None:
            return
        assert self.reports is not None
        reported = trio.Event() if self._in_turn else None
        self.reports.start_soon(self._wait, agent_id, answer, reported)
        if reported is not None:
            await reported.wait()

    def _call(self, done: int, agent_id: str, status: str) -> Awaitable[object] | None:
        """Call the callback now (with the count as it is now); what it returned if that
        is to be awaited.  A broken display must not take the deliberation down."""
        if self._callback is None:
            return None
        try:
            answer = self._callback(done, self._total, agent_id, status)
        except Exception:
            self._failed(agent_id)
            return None
        return answer if inspect.isawaitable(answer) else None

    async def _wait(
        self, agent_id: str, answer: Awaitable[object], reported: trio.Event | None = None
    ) -> None:
        try:
            await answer
        except Exception:
            self._failed(agent_id)
        except trio.Cancelled as exc:
            raise_if_requested(exc)
            log.error(
                "on_progress callback let a stray trio.Cancelled escape; ignored",
                extra={"batch_id": str(self._batch_id), "agent_id": agent_id},
            )
        finally:
            if reported is not None:
                reported.set()

    def _failed(self, agent_id: str) -> None:
        log.exception(
            "on_progress callback raised; ignored",
            extra={"batch_id": str(self._batch_id), "agent_id": agent_id},
        )
