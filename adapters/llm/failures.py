"""How an LLM agent's failure names it, and the few causes a batch's failures come to.

A wrong model or API key fails every agent the same way; 72 lines that differ only in the
agent's id hide that.  :func:`failure_causes` groups a batch's failures by cause (kind,
error type, model and endpoint, and the message without the agent's own part) and
:meth:`FailureCause.summary` says each once::

    72 agents: 404 model 'gpt-x' not found at http://127.0.0.1:8080/v1

Each cause keeps its failures, so nothing of the per-agent detail is lost.  The
orchestrators name an agent with :func:`describe_agent`, and its inverse lives beside it
here.  No openai import: the CLI groups the stub backend's failures too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import attrs

from kernel import AgentFailure, FailureKind

__all__ = ["FailureCause", "describe_agent", "failure_causes", "model_not_found"]

#: What a failure's message says after the agent's description for a model the server
#: does not have (:func:`model_not_found`); :meth:`FailureCause.summary` reads it.
_MODEL_NOT_FOUND = "HTTP 404: model not found"
_STATUS = re.compile(r"HTTP (\d{3})\b")
_AUTH_STATUSES = ("401", "403")


def describe_agent(agent_id: str, model: str, base_url: str, *, framework: str = "") -> str:
    """How every failure names the agent: ``agent 'a1' (gpt-4o at https://...)``, with
    the framework first when there is one (``agent 'a1' (CrewAI, gpt-4o at ...)``)."""
    using = f"{framework}, " if framework else ""
    return f"agent {agent_id!r} ({using}{model} at {base_url})"


def model_not_found(said: str) -> str:
    """The words after the agent's description for a 404 that says the model is not
    there (``said``: the server's own, in parentheses, or "")."""
    return f"{_MODEL_NOT_FOUND} {said}".rstrip()


def _described(failure: AgentFailure) -> tuple[str, str, str] | None:
    """``(model, base_url, the rest)`` of a message that starts with
    :func:`describe_agent`'s words for this failure's agent, else None.  The framework, if
    any, stays part of the model (``CrewAI, gpt-4o``)."""
    prefix = f"agent {failure.agent_id!r} ("
    message = failure.message
    if not message.startswith(prefix):
        return None
    # A base URL holds no whitespace, so the first "): " ends the description.
    inside, sep, rest = message[len(prefix) :].partition("): ")
    model, at, base_url = inside.rpartition(" at ")
    if not sep or not at:
        return None
    return model, base_url, rest


@attrs.frozen(slots=True)
class FailureCause:
    """One cause of failure shared by ``agent_ids``: what failed, where, and how.

    ``model`` and ``base_url`` are None for failures that name no endpoint (a timeout of
    the kernel's, a halt); ``cause`` is the message without the agent's own part.
    ``failures`` are the failures themselves, in the batch's order.
    """

    kind: FailureKind
    error_type: str
    model: str | None
    base_url: str | None
    cause: str
    failures: tuple[AgentFailure, ...]

    @property
    def agent_ids(self) -> tuple[str, ...]:
        return tuple(f.agent_id for f in self.failures)

    @property
    def count(self) -> int:
        return len(self.failures)

    def summary(self) -> str:
        """The cause in one line, said once for every agent it failed::

        72 agents: 404 model 'gpt-x' not found at http://127.0.0.1:8080/v1
        3 agents: 401 authentication failed at https://api.openai.com/v1 (check the API key)
        2 agents: timeout: agent exceeded its timeout of 5 s
        """
        who = f"{self.count} agent{'s' if self.count != 1 else ''}"
        where = self.base_url
        status = _STATUS.match(self.cause)
        if where is not None and self.cause.startswith(_MODEL_NOT_FOUND):
            model = self.model or ""
            shown = model.rpartition(", ")[2]  # without the framework
            return f"{who}: 404 model {shown!r} not found at {where}"
        if where is not None and status and status.group(1) in _AUTH_STATUSES:
            return f"{who}: {status.group(1)} authentication failed at {where} (check the API key)"
        if where is None:
            return f"{who}: {self.kind.value}: {self.cause}"
        return f"{who}: {self.kind.value}: {self.cause} ({self.model} at {where})"


def failure_causes(failures: Iterable[AgentFailure]) -> tuple[FailureCause, ...]:
    """``failures`` grouped by cause: most agents first, then in the order each cause
    first failed an agent.  Works on any failures (``ConcurrentResult.failures``); those
    of the LLM orchestrators are grouped by model and endpoint too."""
    groups: dict[tuple[FailureKind, str, str | None, str | None, str], list[AgentFailure]] = {}
    for failure in failures:
        described = _described(failure)
        model, base_url, cause = described if described else (None, None, failure.message)
        key = (failure.kind, failure.error_type, model, base_url, cause)
        groups.setdefault(key, []).append(failure)
    causes = [
        FailureCause(kind, error_type, model, base_url, cause, tuple(members))
        for (kind, error_type, model, base_url, cause), members in groups.items()
    ]
    causes.sort(key=lambda c: -c.count)  # stable: ties keep their first-failure order
    return tuple(causes)
