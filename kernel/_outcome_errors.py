"""The errors that carry an outcome: a halted batch's partial result, a failed agent's failure.

They live apart from ``_errors`` because they hold domain types, and the domain types'
own validation raises the plain errors: keeping them apart keeps the imports a tree.
"""

from __future__ import annotations

from collections.abc import Mapping

from kernel._errors import ConclaveError
from kernel._frozenmap import FrozenMap
from kernel._types import AgentFailure, ConcurrentResult, scalar_map

__all__ = ["AgentInvocationError", "SystemHaltedError"]


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

    ``metadata``: what the failed call reports about itself, as an output's metadata
    would (model, HTTP statuses, time waited on a rate limit; never content).  The
    service's observers see it (:class:`~kernel.AgentEnded`); an orchestrator may set
    it after construction, before raising.  Checked as an output's: a mapping of str to
    str | int | float, else :class:`~kernel.InvalidRequestError`.
    """

    _metadata: FrozenMap[str | int | float]

    def __init__(
        self,
        message: str,
        failure: AgentFailure | None = None,
        *,
        metadata: Mapping[str, str | int | float] | None = None,
    ) -> None:
        self.failure = failure
        self.metadata = FrozenMap() if metadata is None else metadata
        super().__init__(message)

    @property
    def metadata(self) -> FrozenMap[str | int | float]:
        return self._metadata

    @metadata.setter
    def metadata(self, value: Mapping[str, str | int | float]) -> None:
        self._metadata = scalar_map(value)

    def __reduce__(self) -> tuple[type[AgentInvocationError], tuple[str, AgentFailure | None]]:
        return (type(self), (str(self), self.failure))
