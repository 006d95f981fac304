"""The one LLM-call policy, shared by every orchestrator (OpenAI, CrewAI).

What an agent is asked (:func:`system_prompt_for`, :func:`topic_message`), which failed
attempts are worth another (:func:`classify_failure`), how long to wait before it
(:class:`RetryPolicy`: decorrelated-jitter backoff, a rate limit's ``Retry-After`` within
a cap), and how every failure reads (:func:`describe_agent`, :func:`malformed`,
:func:`over_content_cap`, :meth:`RetryPolicy.gave_up`): an
:class:`~kernel.AgentInvocationError` naming the agent and what went wrong, never the API
key, the prompt or the content.  The orchestrators differ in how they call (the SDK
directly, or CrewAI's executor) and in what waits (the OpenAI one pauses the endpoint's
shared budget on a rate limit, the CrewAI one only its agent); not in these rules.
"""

from __future__ import annotations

import os
import random
import threading
import weakref
from typing import NamedTuple

import openai

from adapters.llm.failures import describe_agent, model_not_found
from adapters.llm.http_guard import refusal_in
from kernel import AgentInvocationError, ContextBundle
from kernel.validate import check_int, check_number

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "KEYLESS",
    "OPENAI_API_URL",
    "AttemptFailure",
    "Backoff",
    "RetryPolicy",
    "RetrySettings",
    "StreamFailedError",
    "classify_failure",
    "describe_agent",
    "endpoint_from_environment",
    "endpoint_source",
    "key_from_environment",
    "malformed",
    "not_retried",
    "out_of_quota",
    "over_content_cap",
    "rate_limited",
    "server_message",
    "system_prompt_for",
    "topic_message",
]

DEFAULT_SYSTEM_PROMPT = (
    "You are {name}, one member of a deliberative council. Read the topic and give "
    "your position on it in a few sentences: what you recommend and why."
)

#: The key sent when there is none: local servers (Ollama, llama.cpp) ignore it.
KEYLESS = "sk-no-key-required"

#: The endpoint meant when none is given, neither as an argument nor as
#: ``$OPENAI_BASE_URL``: the OpenAI API, as the openai SDK has it.
OPENAI_API_URL = "https://api.openai.com/v1"

#: The longest piece of a server's (or a framework's) own words an error message quotes.
MAX_QUOTED_CHARS = 200


# ------------------------------------------------------------------ where, and as whom


def endpoint_from_environment(base_url: str | None) -> str:
    """The endpoint the openai SDK would call: ``base_url`` if given, else
    ``$OPENAI_BASE_URL``, else :data:`OPENAI_API_URL`.

    An empty ``$OPENAI_BASE_URL`` counts as unset (a shell's ``OPENAI_BASE_URL=`` clears
    it).  The result is not checked here: the caller checks it (``check_base_url``),
    naming where it came from (:func:`endpoint_source`).
    """
    if base_url is not None:
        return base_url
    return os.environ.get("OPENAI_BASE_URL") or OPENAI_API_URL


def endpoint_source(base_url: str | None) -> str:
    """Where :func:`endpoint_from_environment` took its answer from, as an error message
    names it: ``base_url`` (also for the default), or ``$OPENAI_BASE_URL``."""
    if base_url is None and os.environ.get("OPENAI_BASE_URL"):
        return "$OPENAI_BASE_URL"
    return "base_url"


def key_from_environment(api_key: str | None) -> str:
    """The API key sent: ``api_key`` if given, else ``$OPENAI_API_KEY``, else
    :data:`KEYLESS` (local servers need none)."""
    return api_key or os.environ.get("OPENAI_API_KEY") or KEYLESS


# ------------------------------------------------------------------ what is asked


def system_prompt_for(template: str, *, agent_id: str, name: str) -> str:
    """``template`` with ``{name}`` and ``{agent_id}`` filled in.  Plain replacement, not
    ``str.format``: a prompt may hold braces of its own (JSON)."""
    return template.replace("{name}", name).replace("{agent_id}", agent_id)


# Each topic's message, built on its first agent's request and shared by every later one
# (of any orchestrator) while the topic lives: a topic may be 1 MiB, and one copy per
# agent was 72 of them.
_topic_messages: weakref.WeakKeyDictionary[ContextBundle, str] = weakref.WeakKeyDictionary()
_topic_messages_lock = threading.Lock()


def topic_message(context: ContextBundle) -> str:
    """What an agent is asked: the topic, then its metadata as a short list::

        Topic motion-7:

        Adopt the budget?

        Context:
        - session: 42

    Built once per topic (per equal :class:`~kernel.ContextBundle`) and shared.
    """
    try:
        with _topic_messages_lock:
            message = _topic_messages.get(context)
            if message is None:
                message = _topic_message(context)
                _topic_messages[context] = message
            return message
    except TypeError:  # a subclass that cannot be hashed or weakly referenced: not shared
        return _topic_message(context)


def _topic_message(context: ContextBundle) -> str:
    message = f"Topic {context.topic_id}:\n\n{context.topic_content}"
    if context.metadata:
        lines = (f"- {key}: {value}" for key, value in sorted(context.metadata.items()))
        message += "\n\nContext:\n" + "\n".join(lines)
    return message


# ------------------------------------------------------------------ how failures read


def malformed(where: str, why: str) -> AgentInvocationError:
    """A response that is not what was asked for (not retried: the same again)."""
    return AgentInvocationError(f"{where}: malformed response ({why})")


def over_content_cap(where: str, cap: int) -> AgentInvocationError:
    return AgentInvocationError(f"{where}: answer over the {cap}-character cap (max_content_chars)")


def not_retried(message: str) -> AgentInvocationError:
    """A failure no retry would help (the same again next time)."""
    return AgentInvocationError(f"{message}; not retried")


def server_message(exc: openai.APIStatusError, api_key: str) -> str:
    """What a server said in an error answer, fit for an error message: short, in
    parentheses, and never the key (providers echo part of it, in auth errors above all)."""
    if exc.status_code in (401, 403):
        return "(authentication failed: check the API key)"
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    text = error.get("message") if isinstance(error, dict) else None
    text = str(text or exc.response.reason_phrase or "")
    if api_key and api_key != KEYLESS:
        text = text.replace(api_key, "***")
    return f"({text[:MAX_QUOTED_CHARS]})" if text else ""


# ------------------------------------------------------------------ which failures retry


def out_of_quota(exc: openai.APIStatusError) -> bool:
    """Whether an error answer says the account is out of quota: OpenAI answers HTTP 429
    with the error code (and type) ``insufficient_quota``, which is not a rate limit."""
    if exc.status_code != 429:
        return False
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)  # the SDK unwraps "error"; a proxy may not
    fields = [exc.code, getattr(exc, "type", None)]
    if isinstance(error, dict):
        fields += [error.get("code"), error.get("type")]
    return "insufficient_quota" in fields


def _says_model(exc: openai.APIStatusError) -> bool:
    """Whether a 404 is about the model (OpenAI's ``model_not_found``; vLLM's "The model
    `x` does not exist"; Ollama's "model 'x' not found") rather than the path (a base URL
    without its ``/v1``), which is a 404 too."""
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body)
    code = error.get("code") if isinstance(error, dict) else None
    text = error.get("message") if isinstance(error, dict) else None
    return (
        exc.code == "model_not_found"
        or code == "model_not_found"
        or (isinstance(text, str) and "model" in text.lower())
    )


def rate_limited(exc: openai.APIStatusError) -> bool:
    """Whether an error answer is a rate limit: a 429 that is not an exhausted quota."""
    return exc.status_code == 429 and not out_of_quota(exc)


class AttemptFailure(NamedTuple):
    """What one failed attempt was: ``what`` (for the retry log and the last error),
    whether it was a rate limit (``throttled``: the endpoint then pauses, not just this
    agent), and ``final``, the error that ends the invocation at once when no retry would
    help (None: worth another attempt).  The error is returned, not raised, so that the
    caller raises it outside its ``except`` block: chained to the failed attempt, it would
    keep that attempt's response (up to a body's cap) alive."""

    what: str
    throttled: bool = False
    final: AgentInvocationError | None = None


class StreamFailedError(Exception):
    """A streamed answer that went wrong; ``failure`` says how (:func:`classify_failure`
    answers it as is)."""

    def __init__(self, failure: AttemptFailure) -> None:
        super().__init__(failure.what)
        self.failure = failure


def classify_failure(exc: BaseException, where: str, api_key: str) -> AttemptFailure | None:
    """The one classification of a failed chat-completion attempt, for every orchestrator.

    Worth another attempt: timeouts, connection failures, HTTP 408, 5xx, and a rate-limit
    429 (``throttled``).  Final (an error naming ``where`` and the status, never the key):
    a response the HTTP client refused (over a cap, a redirect: the same again next
    time), every other status, a 429 out of quota, a request that cannot be encoded, and
    a malformed response.  None: an error this does not know (the caller decides).
    """
    if isinstance(exc, StreamFailedError):
        return exc.failure
    if isinstance(exc, openai.APIConnectionError):  # an APITimeoutError is one too
        refused = refusal_in(exc)
        if refused is not None:
            return AttemptFailure("refused", final=not_retried(f"{where}: {refused}"))
        timed_out = isinstance(exc, openai.APITimeoutError)
        return AttemptFailure("timed out" if timed_out else "connection failed")
    if isinstance(exc, openai.APIStatusError):
        return _status_failure(exc, where, api_key)
    if isinstance(exc, UnicodeEncodeError):  # before ValueError: it is one
        # Something of ours (a header: the API key?) is not encodable: the request never
        # left, and no retry will change that.
        why = f"cannot encode the request ({type(exc).__name__} in {exc.encoding})"
        return AttemptFailure("unencodable", final=not_retried(f"{where}: {why}"))
    if isinstance(exc, openai.APIResponseValidationError | ValueError):
        why = f"{type(exc).__name__}: invalid JSON"
        return AttemptFailure("malformed", final=malformed(where, why))
    if isinstance(exc, RecursionError):
        return AttemptFailure("malformed", final=malformed(where, "JSON nested too deeply"))
    return None


def _status_failure(exc: openai.APIStatusError, where: str, api_key: str) -> AttemptFailure:
    status = exc.status_code
    what = f"HTTP {status}"
    if out_of_quota(exc):
        said = server_message(exc, api_key)
        return AttemptFailure(
            what, final=not_retried(f"{where}: {what}: the account is out of quota {said}")
        )
    # 408 is the server's own request timeout: a timeout, so retried.
    if status not in (408, 429) and status < 500:
        said = server_message(exc, api_key)
        if status == 404 and _says_model(exc):
            return AttemptFailure(what, final=not_retried(f"{where}: {model_not_found(said)}"))
        return AttemptFailure(what, final=not_retried(f"{where}: {what} {said}"))
    return AttemptFailure(what, throttled=status == 429)


# ------------------------------------------------------------------ how long to wait


class RetryPolicy:
    """How many attempts an invocation gets and how long it waits between them; the
    settings checked once, here, for every orchestrator.

    ``max_retries`` retries after the first attempt; each wait is the next step of a
    decorrelated-jitter backoff (:class:`Backoff`, ``backoff_base_s`` to
    ``backoff_cap_s``); a rate limit waits at least the server's ``Retry-After`` and at
    most ``retry_after_cap_s`` (:meth:`throttled_wait_s`).  ``seed`` seeds the jitter
    (tests, benchmarks); one generator serves every invocation of an orchestrator.
    """

    __slots__ = ("backoff_base_s", "backoff_cap_s", "max_retries", "retry_after_cap_s", "rng")

    def __init__(
        self,
        *,
        max_retries: int,
        backoff_base_s: float,
        backoff_cap_s: float,
        retry_after_cap_s: float,
        seed: int | None,
    ) -> None:
        self.max_retries = check_int(max_retries, "max_retries", at_least=0)
        self.backoff_base_s = check_number(backoff_base_s, "backoff_base_s", at_least=0)
        self.backoff_cap_s = check_number(backoff_cap_s, "backoff_cap_s", at_least=0)
        self.retry_after_cap_s = check_number(retry_after_cap_s, "retry_after_cap_s", at_least=0)
        self.rng = random.Random(None if seed is None else check_int(seed, "seed"))

    def backoff(self) -> Backoff:
        """A fresh backoff, for one invocation."""
        return Backoff(self)

    def exhausted(self, attempts: int) -> bool:
        """Whether ``attempts`` attempts are all an invocation gets."""
        return attempts > self.max_retries

    def throttled_wait_s(self, backoff_s: float, retry_after_s: float | None) -> float:
        """How long a rate-limited attempt waits: the server's ``Retry-After`` if longer
        than the backoff, never past ``retry_after_cap_s`` (one absurd header must not
        stall an agent, or an endpoint, for hours)."""
        wait_s = backoff_s if retry_after_s is None else max(backoff_s, retry_after_s)
        return min(wait_s, self.retry_after_cap_s)

    @staticmethod
    def gave_up(where: str, what: str, attempts: int) -> AgentInvocationError:
        """The error of an invocation whose every attempt failed (``what``: the last)."""
        return AgentInvocationError(f"{where}: {what} after {attempts} attempt(s)")


class RetrySettings:
    """An orchestrator's retry settings, read from its :class:`RetryPolicy` (``_retry``)
    rather than kept twice."""

    _retry: RetryPolicy

    @property
    def max_retries(self) -> int:
        return int(self._retry.max_retries)

    @property
    def backoff_base_s(self) -> float:
        return float(self._retry.backoff_base_s)

    @property
    def backoff_cap_s(self) -> float:
        return float(self._retry.backoff_cap_s)

    @property
    def retry_after_cap_s(self) -> float:
        return float(self._retry.retry_after_cap_s)


class Backoff:
    """Decorrelated jitter (as in AWS's "Exponential Backoff And Jitter"): each wait is
    drawn uniformly between the base and three times the previous wait, and capped, so
    72 agents that failed together do not retry together."""

    __slots__ = ("_policy", "_sleep_s")

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._sleep_s = policy.backoff_base_s

    def next_s(self) -> float:
        policy = self._policy
        drawn = policy.rng.uniform(policy.backoff_base_s, self._sleep_s * 3)
        self._sleep_s = min(policy.backoff_cap_s, drawn)
        return self._sleep_s
