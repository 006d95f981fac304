"""The exceptions the kernel raises (those that carry an outcome are in ``_outcome_errors``).

Every error the kernel raises derives from :class:`ConclaveError`, so an embedding
application can catch the library's errors with one clause.  Pool and halt errors
name the rule they enforce (``FR10`` for capacity, ``CT-11`` for halt) and carry the
numbers that broke it, because an operator reading a log line should not have to
reconstruct the arithmetic.
"""

from __future__ import annotations

__all__ = [
    "AgentBusyError",
    "AgentNotFoundError",
    "AgentPoolExhaustedError",
    "ConclaveError",
    "HaltClearDeniedError",
    "InvalidRequestError",
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


class AgentNotFoundError(ConclaveError, LookupError):
    """No agent with that id is known (for example, not in the roster)."""


class HaltClearDeniedError(ConclaveError):
    """CT-11: a halt may only be cleared with at least two distinct approvers."""
