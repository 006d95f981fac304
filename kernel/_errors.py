"""The exceptions the kernel raises.

Every error the kernel raises derives from :class:`ConclaveError`, so an embedding
application can catch the library's errors with one clause.  Pool and halt errors
name the rule they enforce (``FR10`` for capacity, ``CT-11`` for halt) and carry the
numbers that broke it, because an operator reading a log line should not have to
reconstruct the arithmetic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kernel._types import AgentFailure, ConcurrentResult

__all__ = [
    "AgentBusyError",
    "AgentInvocationError",
    "AgentNotFoundError",
    "AgentPoolExhaustedError",
    "ConclaveError",
    "HaltClearDeniedError",
    "InvalidRequestError",
    "SystemHaltedError",
]


class ConclaveError(Exception):
    """Base class of every error raised by conclave-kernel."""


class InvalidRequestError(ConclaveError, ValueError):
    """Input was malformed: a wrong type, an empty id, a duplicate, a bad setting.

    Raised before anything is reserved or invoked, so a caller that sees it knows
    that nothing changed.
    """


class AgentPoolExhaustedError(ConclaveError):
    """FR10: admitting the batch would put more than ``max_concurrent`` agents in flight.

    Admission is all-or-nothing: when this is raised, no slot was reserved and no
    agent was invoked.
    """


class AgentBusyError(AgentPoolExhaustedError):
    """FR10: an agent of the batch is already active (or queued) in another batch.

    An agent deliberates once at a time; the batch is refused as a whole.
    """


class SystemHaltedError(ConclaveError):
    """CT-11: the system is halted.

    Attributes:
        reason: the reason given when the halt was raised.
        partial: ``None`` when the call was refused before anything ran; otherwise a
            :class:`~kernel.ConcurrentResult` with every outcome the batch reached,
            the agents the halt cancelled being ``HALTED`` failures.
    """

    def __init__(self, reason: str, partial: ConcurrentResult | None = None) -> None:
        self.reason = reason
        self.partial = partial
        super().__init__(f"CT-11: system halted: {reason}")

    def __reduce__(self) -> tuple[type[SystemHaltedError], tuple[str, ConcurrentResult | None]]:
        return (type(self), (self.reason, self.partial))


class AgentInvocationError(ConclaveError):
    """An agent could not produce an output.

    Orchestrators raise it (with ``failure=None``) to say why an invocation failed;
    :meth:`ConcurrentDeliberationService.invoke_single` raises it with the
    :class:`~kernel.AgentFailure` that describes the outcome.
    """

    def __init__(self, message: str, failure: AgentFailure | None = None) -> None:
        self.failure = failure
        super().__init__(message)

    def __reduce__(self) -> tuple[type[AgentInvocationError], tuple[str, AgentFailure | None]]:
        return (type(self), (str(self), self.failure))


class AgentNotFoundError(ConclaveError, LookupError):
    """No agent with that id is known (for example, not in the roster)."""


class HaltClearDeniedError(ConclaveError):
    """CT-11: a halt may only be cleared with at least two distinct approvers."""
