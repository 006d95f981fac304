"""An asyncio-native orchestrator for any OpenAI-compatible chat-completions endpoint.

OpenAI, Ollama, vLLM, llama.cpp's server, a LiteLLM proxy: anything that speaks
``POST /v1/chat/completions``.  Run it from trio through
:class:`adapters.llm.bridge.AsyncioOrchestratorBridge`.

Failures it retries (with decorrelated-jitter backoff): timeouts (including HTTP 408),
connection errors, 5xx, and 429 (see below).  Failures it
does not retry: other 4xx (a bad key, a bad request, an unknown model), a 429 that says
the account is out of quota (``insufficient_quota``: no wait brings it back), malformed
responses, a response over a cap or a redirect (below), and a request that cannot be
encoded (:mod:`adapters.llm.policy`, the LLM-call policy the CrewAI orchestrator
shares).  Every failure
is an :class:`~kernel.AgentInvocationError` naming the agent and what went wrong; never
the API key, the prompt or the content.  Its ``metadata`` says what the call was, for
metrics and traces: ``model``, ``attempts``, ``http_status``/``http_statuses`` (below),
``latency_ms`` and ``rate_limited_ms``.

What a server can do is bounded (:mod:`adapters.llm.http_guard`, the HTTP client every
request goes through): ``timeout_s`` is a wall-clock bound on each attempt, from the
connection to the last byte; a body over ``max_response_bytes`` (on the wire, or once
inflated) and an answer over ``max_content_chars`` characters are refused; a redirect is
refused, never followed.  The whole invocation takes at most ``(max_retries + 1)``
attempts of ``timeout_s``, the backoffs between them (each at most ``backoff_cap_s``)
and its turns in the rate-limit budget (below); bound it all with the kernel's
``agent_timeout``.

Each request carries the agent's id in the ``X-Conclave-Agent`` header, so that proxies
and servers can attribute it.  HTTP header values are ASCII, and agent ids need not be
(``"ārchon-Ω"``), so the header holds the id's UTF-8 bytes percent-encoded as in
RFC 3986 section 2.1: every byte outside the unreserved set ``A-Z a-z 0-9 - . _ ~``
becomes ``%XX`` (:func:`encode_agent_header`).  Ids made of unreserved characters, such
as ``archon-7``, travel unchanged; ``"ārchon-Ω"`` travels as ``%C4%81rchon-%CE%A9``.
Decode with ``urllib.parse.unquote`` (:func:`decode_agent_header`).

Rate limits: every HTTP attempt, retries included, first takes its turn in the budget
its endpoint and API key share with every other agent and orchestrator of the process
(:mod:`adapters.llm.provider_budget`): one request and its estimated tokens (the prompt's
UTF-8 bytes / 4, plus ``max_tokens``, or :data:`DEFAULT_COMPLETION_TOKENS` without it),
settled with the real ``usage`` after the call.  The budget paces at ``limits=``
(:class:`ProviderLimits`) and at the server's ``x-ratelimit-*`` headers, and a 429
pauses the whole endpoint until the server's reset (``Retry-After``, else the reset
headers; at most ``retry_after_cap_s``; without either, this agent's backoff), instead
of each agent retrying on its own.  The time an agent waited for its turns is its
output's ``rate_limited_ms``; :meth:`OpenAIChatOrchestrator.limit_stats` sums it up.

Streaming (the default): every call is a streamed chat completion (``stream=True``,
``stream_options={"include_usage": true}``), its content assembled from the deltas.  A
halt, a timeout, a deadline, a quorum cut or a lost hedge cancels the call, which closes
the stream, and a server that streams (llama.cpp, vLLM, OpenAI) stops generating when its
client goes away.  ``stream=False`` sends plain requests, for servers that cannot stream;
its cost: a server that does not stream never sees its client go away and generates to
``max_tokens`` after a halt (llama.cpp's server kept its slot busy for 28 s), and a paid
provider bills for it.  A stream counts as an answer only when it ends with ``[DONE]``:
one that breaks first (connection reset, a server error event, a malformed chunk, the body
ending without ``[DONE]``, a cap, the attempt's deadline) is a failure, retried as any
other only while nothing had been received; once a chunk has come, it is final (a retry
would pay for the generation again).  Metadata: ``first_token_ms`` (invocation start to
the first content of the answer; for ``stream=False`` the whole answer),
``latency_ms`` (to its end), ``http_status`` and ``http_statuses`` (every attempt's
HTTP status, space-separated, ``"error"`` for an attempt without an answer: ``"429
200"``); ``usage`` is ``"reported"`` or ``"estimated"`` (a server
that sent no usage: the prompt's estimate and the content's UTF-8 bytes / 4, which also
settle the rate-limit budget).

Set-up happens when the orchestrator is opened (:meth:`OpenAIChatOrchestrator.aopen`, which
:class:`~adapters.llm.bridge.AsyncioOrchestratorBridge` calls on entry), in a worker
thread and without any network call: one HTTP client per distinct ``base_url`` of the
roster and the default, plus the SDK's lazy imports.  The first batch then does not
stall the event loop building them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, unquote
from uuid import uuid4

import httpx2
import openai

from adapters.llm.http_guard import DEFAULT_MAX_RESPONSE_BYTES, guarded_client, refusal_in
from adapters.llm.model_listing import LISTING_TIMEOUT_S, ModelListing, list_models
from adapters.llm.policy import (
    DEFAULT_SYSTEM_PROMPT,
    KEYLESS,
    MAX_QUOTED_CHARS,
    AttemptFailure,
    RetryPolicy,
    RetrySettings,
    StreamFailedError,
    classify_failure,
    describe_agent,
    endpoint_from_environment,
    endpoint_source,
    key_from_environment,
    malformed,
    not_retried,
    over_content_cap,
    rate_limited,
    system_prompt_for,
    topic_message,
)
from adapters.llm.provider_budget import (
    BudgetAccount,
    ClusterBudget,
    EndpointBudget,
    LimitStats,
    ProviderLimits,
    Ticket,
)
from adapters.llm.ratelimit_headers import RateLimitHeaders
from adapters.llm.trace_headers import add_trace_headers
from adapters.roster import AgentProfile, Roster, check_base_url
from adapters.usage import MAX_CALL_TOKENS
from kernel import AgentInvocationError, AgentOutput, ContextBundle, InvalidRequestError
from kernel.validate import check_int, check_number, utf8_size

__all__ = [
    "AGENT_HEADER",
    "DEFAULT_COMPLETION_TOKENS",
    "DEFAULT_MAX_CONTENT_CHARS",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_SYSTEM_PROMPT",
    "LimitStats",
    "AttemptFailure",
    "StreamFailedError",
    "classify_failure",
    "OpenAIChatOrchestrator",
    "ProviderLimits",
    "decode_agent_header",
    "encode_agent_header",
    "estimate_tokens",
    "topic_message",
]

log = logging.getLogger("adapters.llm.openai_chat")


#: The request header that names the agent (its value: :func:`encode_agent_header`).
AGENT_HEADER = "X-Conclave-Agent"

#: The completion's token estimate for the budget when no ``max_tokens`` is set.
DEFAULT_COMPLETION_TOKENS = 256

#: The longest answer taken, in characters (1 Mi): ~250k tokens, beyond any model's
#: output limit; a longer one is a server gone wrong.
DEFAULT_MAX_CONTENT_CHARS = 1024 * 1024


# Modules the SDK's HTTP stack imports on its first connection rather than when it is
# imported: anyio's asyncio backend (httpcore reaches the network through anyio), ~8 ms
# of imports that would otherwise run on the event loop in the first batch.  Best effort:
# a module that is not there (another SDK version) is skipped.
_LAZY_MODULES = ("anyio._backends._asyncio",)


def encode_agent_header(agent_id: str) -> str:
    """The ``X-Conclave-Agent`` value for ``agent_id``: UTF-8, percent-encoded (RFC 3986).

    Every byte outside ``A-Z a-z 0-9 - . _ ~`` becomes ``%XX``, so the value is plain
    ASCII whatever the id holds, and decoding it gives back the id exactly.
    """
    return quote(agent_id, safe="", encoding="utf-8", errors="strict")


def decode_agent_header(value: str) -> str:
    """The agent id an ``X-Conclave-Agent`` value carries (inverse of the encoding)."""
    return unquote(value, encoding="utf-8", errors="strict")


def estimate_tokens(messages: list[dict[str, str]], max_tokens: int | None) -> int:
    """The tokens a request will use, estimated before it is sent: its messages' UTF-8
    bytes / 4 (about a token each in English; more in scripts of several bytes per
    character, which then count more), 4 per message and 3 for the reply's framing,
    plus ``max_tokens`` (or :data:`DEFAULT_COMPLETION_TOKENS`)."""
    size = sum(utf8_size(str(m.get("content", ""))) for m in messages)
    completion = max_tokens if max_tokens is not None else DEFAULT_COMPLETION_TOKENS
    return math.ceil(size / 4) + 4 * len(messages) + 3 + completion


def _count_of(value: Any) -> int | None:
    """A token count as a server reports it: an int >= 0, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


#: The longest model name taken from an answer (real ones are tens of characters).
MAX_MODEL_NAME_CHARS = 256


def _model_named(value: Any) -> str:
    """The model an answer says answered, if it is a name at all, else "" (then the
    model asked for is reported).  It becomes metrics labels, span names and log fields:
    a lone surrogate (JSON's ``"\\ud800"``) made every later scrape and push fail to
    encode, and control characters or a megabyte are no model's name."""
    # isprintable(): no surrogates, control or format characters (a bidi override).
    if isinstance(value, str) and 0 < len(value) <= MAX_MODEL_NAME_CHARS and value.isprintable():
        return value
    return ""


class _Answer:
    """One answer (streamed or not): its content and what came with it."""

    __slots__ = (
        "completion_tokens",
        "content",
        "estimated",
        "finish_reason",
        "first_token_at",
        "model",
        "prompt_tokens",
        "total_tokens",
    )

    def __init__(self, content: str, model: str) -> None:
        self.content = content
        self.model = model
        self.finish_reason = ""
        self.first_token_at = time.perf_counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.total_tokens: int | None = None  # None: the server did not say
        self.estimated = False

    def set_usage(self, usage: Any) -> None:
        """Take a ``usage`` object or dict (either as the server sent it)."""
        names = ("total_tokens", "prompt_tokens", "completion_tokens")
        fields = usage if isinstance(usage, dict) else {n: getattr(usage, n, None) for n in names}
        # A count past belief (adapters.usage.MAX_CALL_TOKENS) is a lie: estimated instead,
        # marked so (10**400 does not fit the budget's float; 10**30 swamps every sum).
        if any(isinstance(c, int) and c > MAX_CALL_TOKENS for c in map(fields.get, names)):
            return
        self.total_tokens = _count_of(fields.get("total_tokens"))
        self.prompt_tokens = _count_of(fields.get("prompt_tokens")) or 0
        self.completion_tokens = _count_of(fields.get("completion_tokens")) or 0

    def settle(self, messages: list[dict[str, str]]) -> float:
        """The tokens this answer used: as reported, else estimated (and marked so)."""
        if self.total_tokens is None:
            self.estimated = True
            self.prompt_tokens = estimate_tokens(messages, 0)
            self.completion_tokens = math.ceil(utf8_size(self.content) / 4)
            return float(self.prompt_tokens + self.completion_tokens)
        return float(self.total_tokens)


_JSON_DECODER = json.JSONDecoder()


class _StreamReader:
    """Reads one streamed chat completion (server-sent events) into an :class:`_Answer`.

    Per chunk: a split on newlines, one ``json.loads`` and a few dict look-ups (no SDK
    model per chunk).  Any way the stream can go wrong is a :class:`StreamFailedError`:
    worth another attempt (as the same failure without a stream would be) only while
    nothing has been received; after that, final.
    """

    __slots__ = (
        "_api_key",
        "_cap",
        "_chunks",
        "_event",
        "_pieces",
        "_size",
        "_where",
        "answer",
        "choices",
        "done",
    )

    def __init__(self, max_content_chars: int, where: str, api_key: str) -> None:
        self._cap = max_content_chars
        self._where = where
        self._api_key = api_key
        self._pieces: list[str] = []  # every content delta (None: none yet)
        self._size = 0
        self._chunks = 0  # chunks received (the retry rule's "something came")
        self._event = ""
        self.answer = _Answer("", "")
        self.answer.first_token_at = 0.0
        self.choices = False  # whether any chunk had a choice
        self.done = False

    async def read(self, response: httpx2.Response) -> _Answer:
        failure: AttemptFailure | None = None
        try:
            await self._consume(response.aiter_bytes())
        except httpx2.RequestError as exc:
            failure = self._broken(exc)
        if failure is not None:  # raised out of the except block (see AttemptFailure)
            raise StreamFailedError(failure)
        if not self.done:
            raise StreamFailedError(self._failed("the stream ended without [DONE]"))
        if not self.choices:
            raise StreamFailedError(self._malformed("no choices"))
        if self._size == 0 and not self._pieces:
            raise StreamFailedError(self._malformed("null content"))
        if not self.answer.finish_reason:
            # [DONE] without a finish_reason: the server cut the answer short (llama-cpp-
            # python's server does so to a stream when another request comes in).  Never
            # a truncated answer released; nothing was, so another attempt is safe.
            raise StreamFailedError(AttemptFailure("the stream was cut short (no finish_reason)"))
        answer = self.answer
        answer.content = "".join(self._pieces)
        if not answer.first_token_at:  # an empty answer: it came whole at the end
            answer.first_token_at = time.perf_counter()
        return answer

    async def _consume(self, body: AsyncIterator[bytes]) -> None:
        rest = b""
        data: list[bytes] = []
        async for block in body:
            lines = (rest + block).split(b"\n")
            rest = lines.pop()
            for line in lines:
                if line.endswith(b"\r"):
                    line = line[:-1]
                if line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                elif not line:  # the end of an event
                    if data:
                        self._take(b"\n".join(data))
                        data.clear()
                        if self.done:
                            return
                    self._event = ""
                elif line.startswith(b"event:"):
                    self._event = line[6:].strip().decode("utf-8", "replace")

    def _take(self, data: bytes) -> None:
        """One event's data: a chunk, an error, or ``[DONE]``."""
        if data == b"[DONE]":
            self.done = True
            return
        try:
            chunk = self._json(data)
        except (ValueError, RecursionError):
            raise StreamFailedError(self._malformed("a chunk that is not JSON")) from None
        if not isinstance(chunk, dict):
            raise StreamFailedError(self._malformed("a chunk that is not an object"))
        if chunk.get("error") or self._event == "error":
            raise StreamFailedError(self._error_event(chunk.get("error")))
        self._chunks += 1
        answer = self.answer
        choices = chunk.get("choices")
        if choices:
            self._delta(choices)
        elif choices is not None and not isinstance(choices, list):
            raise StreamFailedError(self._malformed("a chunk that is not a chat delta"))
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            answer.set_usage(usage)
        if not answer.model:
            answer.model = _model_named(chunk.get("model"))

    @staticmethod
    def _json(data: bytes) -> Any:
        """``json.loads(data)``, in half the time for what a chunk is: an object, UTF-8.

        ``json.loads`` of bytes first guesses their encoding and skips whitespace with two
        regular expressions, a third of its time on a small chunk; an object has no
        whitespace before it, and UTF-8 is what ``json.loads`` guesses for it (no BOM, no
        NUL bytes: it starts ``{"``).  Anything else is left to ``json.loads``."""
        if data[:2] != b'{"':
            return json.loads(data)
        text = data.decode("utf-8", "surrogatepass")  # as json.loads decodes bytes
        doc, end = _JSON_DECODER.raw_decode(text)
        if end != len(text) and text[end:].strip(" \t\n\r"):  # JSON's whitespace only
            raise ValueError("extra data after the JSON object")
        return doc

    def _delta(self, choices: Any) -> None:
        """The first choice's delta: content appended (within the cap), its finish."""
        choice = choices[0] if isinstance(choices, list) else None
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            raise StreamFailedError(self._malformed("a chunk that is not a chat delta"))
        assert isinstance(choice, dict)
        self.choices = True
        content = delta.get("content")
        if isinstance(content, str):
            if content and not self.answer.first_token_at:
                self.answer.first_token_at = time.perf_counter()
            self._pieces.append(content)
            self._size += len(content)
            if self._size > self._cap:
                over = over_content_cap(self._where, self._cap)
                raise StreamFailedError(AttemptFailure("over cap", final=over))
        elif delta.get("refusal"):
            raise StreamFailedError(self._malformed("refused"))
        finish = choice.get("finish_reason")
        if finish:
            self.answer.finish_reason = str(finish)

    def _failed(self, what: str) -> AttemptFailure:
        """A stream that broke: worth another attempt only if nothing had come."""
        if not self._chunks:
            return AttemptFailure(what)
        return AttemptFailure(
            what, final=not_retried(f"{self._where}: {what} after {self._chunks} chunk(s)")
        )

    def _broken(self, exc: httpx2.RequestError) -> AttemptFailure:
        refused = refusal_in(exc)
        if refused is not None:
            return AttemptFailure("refused", final=not_retried(f"{self._where}: {refused}"))
        if isinstance(exc, httpx2.TimeoutException):
            return self._failed("the stream timed out")
        return self._failed(f"the stream broke ({type(exc).__name__})")

    def _error_event(self, error: Any) -> AttemptFailure:
        message = str(error.get("message") or "") if isinstance(error, dict) else ""
        if self._api_key != KEYLESS:  # providers echo part of a key in their errors
            message = message.replace(self._api_key, "***")
        said = f" ({message[:MAX_QUOTED_CHARS]})" if message else ""
        return self._failed(f"the server sent an error event{said}")

    def _malformed(self, why: str) -> AttemptFailure:
        return AttemptFailure("malformed", final=malformed(self._where, why))


class OpenAIChatOrchestrator(RetrySettings):
    """One chat completion per agent invocation, settings per agent from a :class:`Roster`.

    Args:
        base_url: the endpoint, e.g. ``https://api.openai.com/v1`` or
            ``http://127.0.0.1:11434/v1`` (Ollama).  None: ``$OPENAI_BASE_URL``, else the
            OpenAI API (``https://api.openai.com/v1``), as the openai SDK does.
        model: the default model.
        api_key: defaults to ``$OPENAI_API_KEY``; without either, a placeholder is sent
            (local servers need none).  Never logged; redacted in ``repr``.
        roster: per-agent settings.  With a roster, invoking an agent not in it raises
            :class:`~kernel.AgentNotFoundError`; without one, any agent id is served
            with the defaults.
        timeout_s: each attempt's wall-clock bound, connection to last byte (a profile's
            ``timeout_s`` overrides it).
        max_retries: retries after the first attempt for retryable failures.
        system_prompt, temperature, max_tokens: defaults for profiles that leave them unset.
            ``{name}`` and ``{agent_id}`` in the system prompt are filled in.
        backoff_base_s, backoff_cap_s: decorrelated-jitter backoff bounds.
        retry_after_cap_s: the longest a 429 pauses the endpoint (``Retry-After`` or
            reset headers beyond it are cut to it).
        seed: seeds the backoff jitter (tests, benchmarks).
        limits: the provider's limits for this key (:class:`ProviderLimits`); without
            them the budget follows the server's ``x-ratelimit-*`` headers alone.  Shared:
            the budget of an endpoint and key keeps the strictest limits any
            orchestrator gave it.  With ``shared=`` (a store such as
            :class:`adapters.valkey.ValkeyProviderBudget`) the budget is every
            replica's (:class:`~adapters.llm.provider_budget.ClusterBudget`).
        max_response_bytes: the largest response body taken, on the wire and inflated
            (default :data:`~adapters.llm.http_guard.DEFAULT_MAX_RESPONSE_BYTES`, 8 MiB).
        max_content_chars: the longest answer taken (default
            :data:`DEFAULT_MAX_CONTENT_CHARS`, 1 Mi characters).
        stream: stream every call (the default).  False for a server that cannot
            stream; it then generates on after a halt (module docstring).
        transport: the HTTP transport under the SDK: ``"httpx"`` (the SDK's default,
            httpx2), ``"aiohttp"`` (the SDK's ``DefaultAioHttpClient``; needs the
            ``aiohttp`` extra, else :class:`~kernel.InvalidRequestError`) or ``"auto"``
            (aiohttp where installed).  Either is guarded alike (:mod:`http_guard`).
    """

    def __init__(
        self,
        base_url: str | None,
        model: str,
        *,
        api_key: str | None = None,
        roster: Roster | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        temperature: float | None = None,
        max_tokens: int | None = None,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 8.0,
        retry_after_cap_s: float = 30.0,
        seed: int | None = None,
        limits: ProviderLimits | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS,
        stream: bool = True,
        transport: str = "httpx",
    ) -> None:
        endpoint = check_base_url(endpoint_from_environment(base_url), endpoint_source(base_url))
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequestError("model must be a non-empty string")
        if roster is not None and not isinstance(roster, Roster):
            raise InvalidRequestError(f"roster must be a Roster, got {type(roster).__name__}")
        if not isinstance(stream, bool):
            raise InvalidRequestError(f"stream must be a bool, got {type(stream).__name__}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise InvalidRequestError("api_key must be a non-empty string or None")
        if limits is not None and not isinstance(limits, ProviderLimits):
            raise InvalidRequestError(
                f"limits must be a ProviderLimits or None, got {type(limits).__name__}"
            )
        # Validate the defaults the same way a roster entry is validated.
        AgentProfile(
            agent_id="defaults",
            system_prompt=system_prompt,
            temperature=temperature,
            max_tokens=max_tokens,
            timeout_s=timeout_s,
        )
        self.base_url = endpoint.rstrip("/")
        self.model = model
        self.roster = roster
        self.timeout_s = check_number(timeout_s, "timeout_s", above=0)
        self._retry = RetryPolicy(
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            retry_after_cap_s=retry_after_cap_s,
            seed=seed,
        )
        self.system_prompt = system_prompt
        self.temperature = temperature
        self.max_tokens = max_tokens
        self._api_key = key_from_environment(api_key)
        self.limits = limits
        self.max_response_bytes = check_int(max_response_bytes, "max_response_bytes", at_least=1)
        self.max_content_chars = check_int(max_content_chars, "max_content_chars", at_least=1)
        self.stream = stream
        self.transport = _transport(transport)
        self._clients: dict[str, openai.AsyncOpenAI] = {}
        self._account = BudgetAccount(self._api_key, limits)
        # aopen() builds clients in a worker thread: never two for one URL.
        self._clients_lock = threading.Lock()

    def __repr__(self) -> str:
        key = "none" if self._api_key == KEYLESS else "***"
        return (
            f"OpenAIChatOrchestrator(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key={key}, agents={len(self.roster) if self.roster else 'any'})"
        )

    # ------------------------------------------------------------ lifecycle

    def _client(self, base_url: str) -> openai.AsyncOpenAI:
        client = self._clients.get(base_url)
        if client is None:
            with self._clients_lock:
                client = self._clients.get(base_url)
                if client is None:
                    # Any: openai 2 (the CrewAI environment) types this as httpx's client,
                    # and takes httpx2's all the same.
                    http_client: Any = guarded_client(
                        self.timeout_s,
                        self.max_response_bytes,
                        client_class=(
                            _aiohttp_client_class()
                            if self.transport == "aiohttp"
                            else httpx2.AsyncClient
                        ),
                    )
                    # Retries are ours (decorrelated jitter, Retry-After cap, attempt count
                    # in the output), so the SDK's own are off.
                    client = openai.AsyncOpenAI(
                        base_url=base_url,
                        api_key=self._api_key,
                        max_retries=0,
                        timeout=self.timeout_s,
                        http_client=http_client,
                    )
                    self._clients[base_url] = client
        return client

    def _budget(self, base_url: str) -> EndpointBudget | ClusterBudget:
        return self._account.budget(base_url)

    def limit_stats(self) -> LimitStats:
        """What rate limiting has cost this orchestrator's agents so far."""
        return self._account.stats()

    def _count(self, *, waited_s: float = 0.0, throttled: bool = False) -> None:
        self._account.count(waited_s=waited_s, throttled=throttled)

    def base_urls(self) -> list[str]:
        """Every endpoint this orchestrator can call: the default, then the roster's."""
        urls = [self.base_url]
        for profile in self.roster or ():
            url = (profile.base_url or self.base_url).rstrip("/")
            if url not in urls:
                urls.append(url)
        return urls

    def prepare(self) -> None:
        """Build every HTTP client and load what the SDK loads lazily; no network call.

        Synchronous and safe to run in a worker thread before the first ``invoke``;
        :meth:`aopen` does exactly that.  Idempotent.
        """
        for url in self.base_urls():
            self._budget(url)
            client = self._client(url)
            # The SDK builds its resources (and imports their modules) on first access.
            _ = client.chat.completions, client.models
        for name in _LAZY_MODULES:
            with contextlib.suppress(ImportError):
                importlib.import_module(name)

    async def aopen(self) -> None:
        """Set up (:meth:`prepare`) in a worker thread, so the event loop stays free.

        Optional: without it, each client is built on the first request that needs it, on
        the event loop (tens of milliseconds during which nothing else runs).
        """
        await asyncio.to_thread(self.prepare)

    async def aclose(self) -> None:
        """Close every HTTP client (connection pools) this orchestrator opened."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.close()

    async def check_reachable(self, timeout_s: float | None = None) -> bool:
        """Fail fast on a wrong host or port: probe ``GET /models`` once.

        Only a connection failure means unreachable: refused, DNS, no route, or no
        connection set up within the limit; it raises :class:`AgentInvocationError`.
        Any HTTP answer (even 401 or 404) is reachable: returns True.  A server that
        takes the connection but does not answer within the limit is *busy*, not gone
        (llama.cpp's server answers ``/models`` only between generations): it is
        logged as a warning and False is returned, so the caller can go on.

        ``timeout_s`` defaults to this orchestrator's ``timeout_s``: the probe waits
        as long as an agent's request would.
        """
        limit = (
            self.timeout_s if timeout_s is None else check_number(timeout_s, "timeout_s", above=0)
        )
        client = self._client(self.base_url)
        try:
            await client.models.list(timeout=limit)
        except openai.APITimeoutError as exc:
            # The SDK's aiohttp transport reports a refused connection or a failed name
            # lookup as a connect timeout: the OS's error, when there is one, says which.
            failed = _os_failure(exc)
            if failed is None and not _never_connected(exc):
                log.warning(
                    "endpoint did not answer the reachability probe; assuming it is busy",
                    extra={"base_url": self.base_url, "timeout_s": limit},
                )
                return False
            raise AgentInvocationError(
                f"cannot reach {self.base_url}: {failed or 'connect timed out'}"
            ) from None
        except openai.APIConnectionError as exc:
            if refusal_in(exc) is not None:  # it answered: what it said is the agents' concern
                return True
            raise AgentInvocationError(
                f"cannot reach {self.base_url}: {_os_failure(exc) or type(exc).__name__}"
            ) from None
        except openai.APIError:
            return True
        return True

    def models_by_endpoint(self) -> dict[str, list[str]]:
        """The models each endpoint will be asked for: the default at the default URL,
        and every roster profile's (its own, or the default) at its URL."""
        wanted: dict[str, list[str]] = {}
        profiles = list(self.roster or ()) or [AgentProfile(agent_id="defaults")]
        for profile in profiles:
            url = (profile.base_url or self.base_url).rstrip("/")
            models = wanted.setdefault(url, [])
            model = profile.model or self.model
            if model not in models:
                models.append(model)
        return wanted

    async def list_models(self, timeout_s: float = LISTING_TIMEOUT_S) -> list[ModelListing]:
        """What each endpoint of :meth:`models_by_endpoint` lists (at once, ``timeout_s``
        at most): a :class:`~adapters.llm.model_listing.ModelListing` each, in order."""
        limit = check_number(timeout_s, "timeout_s", above=0)
        urls = list(self.models_by_endpoint())
        return list(
            await asyncio.gather(*(list_models(self._client(url), url, limit) for url in urls))
        )

    # ------------------------------------------------------------ one agent

    def _profile(self, agent_id: str) -> AgentProfile:
        if self.roster is not None:
            return self.roster.get(agent_id)
        return AgentProfile(agent_id=agent_id)

    def _request(
        self, agent_id: str, context: ContextBundle
    ) -> tuple[dict[str, Any], str, str, int | None]:
        """The chat-completion request for one agent, with its model, base URL and
        ``max_tokens`` (profile first, then the orchestrator's defaults)."""
        profile = self._profile(agent_id)
        model = profile.model or self.model
        base_url = (profile.base_url or self.base_url).rstrip("/")
        temperature = profile.temperature if profile.temperature is not None else self.temperature
        max_tokens = profile.max_tokens or self.max_tokens
        system = system_prompt_for(
            profile.system_prompt or self.system_prompt, agent_id=agent_id, name=profile.name
        )
        headers = {AGENT_HEADER: encode_agent_header(agent_id)}
        add_trace_headers(headers)  # the agent's span, when the process traces
        request: dict[str, Any] = {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": topic_message(context)},
            ],
            "timeout": profile.timeout_s or self.timeout_s,
            # Lets proxies and test servers attribute a request to an agent.  Encoded:
            # header values are ASCII, agent ids need not be (see the module docstring).
            "extra_headers": headers,
        }
        if temperature is not None:
            request["temperature"] = temperature
        if max_tokens is not None:
            request["max_tokens"] = max_tokens
        if self.stream:
            request["stream"] = True
            request["stream_options"] = {"include_usage": True}
        return request, model, base_url, max_tokens

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        request, model, base_url, max_tokens = self._request(agent_id, context)
        client = self._client(base_url)
        budget = self._budget(base_url)
        tokens = estimate_tokens(request["messages"], max_tokens)
        where = describe_agent(agent_id, model, base_url)
        started = time.perf_counter()
        attempts = 0
        waited_s = 0.0
        statuses: list[str] = []  # each attempt's HTTP status, or "error" (no answer)
        backoff = self._retry.backoff()
        while True:
            attempts += 1
            # Every attempt, retries included, waits for its turn in the shared budget.
            ticket = await budget.acquire(tokens)
            waited_s += ticket.waited_s
            self._count(waited_s=ticket.waited_s)
            outcome = _Outcome()
            try:
                answer = await self._attempt(client, request, budget, ticket, outcome, where)
                statuses.append(outcome.status)
                break
            except Exception as exc:
                statuses.append(outcome.status)
                failure = classify_failure(exc, where, self._api_key)
                if failure is None:
                    raise
                what, throttled, final = failure
            # Raised here, out of the except block, so that the error does not keep the
            # failed attempt alive (its traceback's frames hold up to a body's cap).
            if final is None and self._retry.exhausted(attempts):
                final = self._retry.gave_up(where, what, attempts)
            if final is not None:
                final.metadata = {
                    "model": model,
                    "attempts": attempts,
                    "http_status": statuses[-1],
                    "http_statuses": " ".join(statuses),
                    "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
                    "rate_limited_ms": round(waited_s * 1000.0, 3),
                }
                raise final
            sleep_s = backoff.next_s()
            if throttled:
                # The whole endpoint waits: for the server's reset if it gave one (done
                # by the budget), else for our backoff.  Our next turn comes after it.
                if not outcome.paused:
                    budget.pause(self._retry.throttled_wait_s(sleep_s, None))
                delay_s = 0.0
            else:
                delay_s = sleep_s
            log.info(
                "retrying chat completion",
                extra={
                    "agent_id": agent_id,
                    "attempt": attempts,
                    "cause": what,
                    "delay_s": round(delay_s, 3),
                },
            )
            if delay_s:
                await asyncio.sleep(delay_s)

        metadata: dict[str, str | int | float] = {
            "model": answer.model or model,
            "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "usage": "estimated" if answer.estimated else "reported",
            "attempts": attempts,
            "http_status": statuses[-1],
            "http_statuses": " ".join(statuses),
            "first_token_ms": round((answer.first_token_at - started) * 1000.0, 3),
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "rate_limited_ms": round(waited_s * 1000.0, 3),
        }
        return AgentOutput(
            agent_id=agent_id, request_id=uuid4(), content=answer.content, metadata=metadata
        )

    async def _attempt(
        self,
        client: openai.AsyncOpenAI,
        request: dict[str, Any],
        budget: EndpointBudget | ClusterBudget,
        ticket: Ticket,
        outcome: _Outcome,
        where: str,
    ) -> _Answer:
        """One HTTP attempt, its outcome reported to the budget whatever it is (an
        answer, an error status, no answer at all, a cancellation)."""
        report: RateLimitHeaders | None = None
        used: float | None = None
        throttled = False
        try:
            if self.stream:
                completions = client.chat.completions.with_streaming_response
                async with completions.create(**request) as response:
                    report = RateLimitHeaders.parse(response.headers)
                    http = response.http_response
                    outcome.status = str(http.status_code)
                    if http.headers.get("content-type", "").startswith("text/event-stream"):
                        reader = _StreamReader(self.max_content_chars, where, self._api_key)
                        answer = await reader.read(http)
                    else:  # a server that does not stream answers whole: taken as such
                        answer = self._answer(await _whole_body(http), where)
            else:
                raw = await client.chat.completions.with_raw_response.create(**request)
                outcome.status = str(raw.http_response.status_code)
                report = RateLimitHeaders.parse(raw.headers)
                answer = self._answer(raw.http_response.content, where)
            used = answer.settle(request["messages"])
            return answer
        except openai.APIStatusError as exc:
            outcome.status = str(exc.status_code)
            report = RateLimitHeaders.parse(exc.response.headers)
            # An exhausted quota is no rate limit: it neither pauses nor counts as one.
            throttled = rate_limited(exc)
            if throttled:
                self._count(throttled=True)
            raise
        finally:
            pause = budget.finish(
                ticket,
                report,
                used_tokens=used,
                throttled=throttled,
                max_pause_s=self.retry_after_cap_s,
            )
            outcome.paused = pause is not None

    def _answer(self, body: bytes, where: str) -> _Answer:
        """What a whole (not streamed) chat completion answered, or why it is malformed.

        Read with ``json.loads``, not the SDK's models: the same checks for a fraction of
        the CPU."""
        doc = json.loads(body)  # ValueError, RecursionError: classify_failure's malformed
        choices = doc.get("choices") if isinstance(doc, dict) else None
        if not isinstance(choices, list):
            raise malformed(where, "not a chat completion")
        if not choices:
            raise malformed(where, "no choices")
        choice = choices[0]
        if not isinstance(choice, dict):
            raise malformed(where, "not a chat completion")
        message = choice.get("message")
        message = message if isinstance(message, dict) else {}
        content = message.get("content")
        if not isinstance(content, str):
            why = "refused" if message.get("refusal") else "null content"
            raise malformed(where, why)
        if len(content) > self.max_content_chars:
            raise over_content_cap(where, self.max_content_chars)
        answer = _Answer(content, _model_named(doc.get("model")))
        answer.finish_reason = str(choice.get("finish_reason") or "")
        answer.set_usage(doc.get("usage"))
        return answer


#: The HTTP transports the orchestrator can put under the SDK (``transport=``).
TRANSPORTS = ("httpx", "aiohttp", "auto")


def aiohttp_installed() -> bool:
    """Whether the SDK's aiohttp transport can be used (the ``aiohttp`` extra): aiohttp is
    there, and the SDK's ``DefaultAioHttpClient`` is an httpx2 client (openai 3; openai 2's
    is httpx's, which the guard does not wrap) that is not the stand-in the SDK defines
    when its aiohttp adapter cannot be imported."""
    if importlib.util.find_spec("aiohttp") is None:
        return False
    client_class = getattr(openai, "DefaultAioHttpClient", None)
    return (
        isinstance(client_class, type)
        and issubclass(client_class, httpx2.AsyncClient)
        and not client_class.__name__.startswith("_Missing")
    )


def _aiohttp_client_class() -> type[httpx2.AsyncClient]:
    client_class: Any = openai.DefaultAioHttpClient  # openai 2 types it as httpx's
    return client_class  # type: ignore[no-any-return]


def _transport(transport: object) -> str:
    """``transport`` checked, ``"auto"`` resolved: aiohttp where installed, else httpx."""
    if transport not in TRANSPORTS:
        raise InvalidRequestError(
            f"transport must be one of {', '.join(TRANSPORTS)}, got {transport!r}"
        )
    if transport == "auto":
        return "aiohttp" if aiohttp_installed() else "httpx"
    if transport == "aiohttp" and not aiohttp_installed():
        raise InvalidRequestError(
            "transport='aiohttp' needs aiohttp: pip install 'conclave-kernel[aiohttp]'"
        )
    return str(transport)


class _Outcome:
    """What an attempt tells its retry loop besides its result or error."""

    __slots__ = ("paused", "status")

    def __init__(self) -> None:
        self.paused = False  # a 429 whose reset already paused the endpoint
        self.status = "error"  # the HTTP status once one came; "error": no answer at all


async def _whole_body(response: httpx2.Response) -> bytes:
    """A response's body, its transport errors the SDK's (as the SDK reads a body)."""
    request: Any = response.request  # openai 2 (CrewAI's) types it as httpx's
    try:
        return await response.aread()
    except httpx2.TimeoutException as exc:
        raise openai.APITimeoutError(request=request) from exc
    except httpx2.RequestError as exc:
        raise openai.APIConnectionError(request=request) from exc


def _os_failure(exc: BaseException) -> str | None:
    """What the OS said when connecting failed (``connection refused``, ``name lookup
    failed (Name or service not known)``), from the error's causes; None if it said
    nothing.  Only the OS's words: a transport's own message may quote a proxy's URL."""
    cause = exc.__cause__
    for _ in range(8):  # a short chain; bounded all the same
        if cause is None:
            return None
        if isinstance(cause, socket.gaierror):
            return f"name lookup failed ({cause.strerror})"
        if isinstance(cause, OSError) and isinstance(cause.errno, int) and cause.errno > 0:
            return os.strerror(cause.errno).lower()
        cause = cause.__cause__ or cause.__context__
    return None


def _never_connected(exc: BaseException) -> bool:
    """Whether a timeout happened while connecting (by name: the SDK's transport is
    ``httpx`` or ``httpx2`` depending on its version; both call it ``ConnectTimeout``)."""
    cause = exc.__cause__
    for _ in range(8):  # a short chain; bounded all the same
        if cause is None:
            return False
        if type(cause).__name__ == "ConnectTimeout":
            return True
        cause = cause.__cause__ or cause.__context__
    return False
