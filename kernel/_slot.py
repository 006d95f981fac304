"""A slot: one borrowed limiter token, held on behalf of one agent (or one hedge call)."""

from __future__ import annotations

import trio

__all__ = ["Slot"]


class Slot:
    """One borrowed limiter token, held on behalf of one agent.

    Each reservation gets a fresh slot object as its limiter borrower, because a
    ``CapacityLimiter`` borrower may hold only one token at a time, and so that a stale
    release (after :meth:`AgentPool.reset`) is recognised and ignored.
    """

    __slots__ = ("_scope", "agent_id", "extra", "lease", "lost")

    def __init__(self, agent_id: str, *, extra: bool = False, lease: str | None = None) -> None:
        self.agent_id = agent_id
        # An extra slot is a second call of an agent that is already active (a hedge):
        # it holds a limiter token, but the agent is counted active once.
        self.extra = extra
        # Its lease in the pool's shared capacity, if it has one.
        self.lease = lease
        #: Why its shared lease was lost (see :class:`~kernel.LeaseLossNotifier`), if it was.
        self.lost: str | None = None
        self._scope: trio.CancelScope | None = None

    def guard(self) -> trio.CancelScope:
        """A cancel scope for the work this slot admits: cancelled when its shared lease is
        lost (at once if it already is)."""
        scope = self._scope = trio.CancelScope()
        if self.lost is not None:
            scope.cancel()
        return scope

    def lose(self, why: str) -> None:
        """Its shared lease was lost (the pool says so): cancel what it admits."""
        if self.lost is None:
            self.lost = why
        if self._scope is not None:
            self._scope.cancel()

    def __repr__(self) -> str:
        return f"<slot {self.agent_id!r}>"
