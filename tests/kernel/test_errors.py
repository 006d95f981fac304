"""The kernel's errors: one base class, and the standard bases callers already catch."""

from __future__ import annotations

import pytest

from kernel import (
    AgentBusyError,
    AgentNotFoundError,
    AgentPoolExhaustedError,
    AgentRequest,
    ConclaveError,
    ContextBundle,
    HaltClearDeniedError,
    InvalidRequestError,
)


def test_invalid_request_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        AgentRequest("", ContextBundle("t", "c"))


def test_every_kernel_error_is_a_conclave_error_and_busy_is_exhausted() -> None:
    for error in (
        InvalidRequestError,
        AgentPoolExhaustedError,
        AgentBusyError,
        AgentNotFoundError,
        HaltClearDeniedError,
    ):
        assert issubclass(error, ConclaveError)
    # A caller that handles "no room" handles "that agent is busy" too.
    assert issubclass(AgentBusyError, AgentPoolExhaustedError)
    assert issubclass(AgentNotFoundError, LookupError)
