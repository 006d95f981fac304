"""The errors that carry an outcome: a halt's partial result, an agent's failure."""

from __future__ import annotations

import pickle
from uuid import uuid4

from kernel import (
    AgentFailure,
    AgentInvocationError,
    FailureKind,
    SystemHaltedError,
)


def test_system_halted_error_carries_reason_and_partial() -> None:
    err = SystemHaltedError("storm", partial=None)
    assert str(err) == "CT-11: system halted: storm"
    again = pickle.loads(pickle.dumps(err))
    assert again.reason == "storm" and again.partial is None


def test_agent_invocation_error_keeps_its_failure_through_pickle() -> None:
    failure = AgentFailure("a", uuid4(), FailureKind.TIMEOUT, "", "too slow", 5.0)
    err = AgentInvocationError("agent 'a' failed", failure=failure)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == "agent 'a' failed" and again.failure == failure
