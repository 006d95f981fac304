"""Real CrewAI agents as an asyncio orchestrator; run it from trio through the bridge::

    roster = Roster.load("archons-base.json")
    orchestrator = CrewAIOrchestrator(roster, base_url="http://127.0.0.1:8080/v1", model="smollm2")
    async with AsyncioOrchestratorBridge(orchestrator) as agents:
        service = ConcurrentDeliberationService(agents, halt, AgentPool(max_concurrent=72))
        result = await service.invoke_concurrent(roster.requests(context))

Each agent of the roster is a CrewAI ``Agent`` (``role``, ``goal`` and ``backstory`` from
its profile, its ``system_prompt`` put first in the system message) asked one CrewAI
``Task``: the topic.  The LLM is CrewAI's native OpenAI-compatible provider pointed at
``base_url`` (no LiteLLM).  Needs the ``crewai`` extra (its own environment: crewai 1.15
pins openai<3; see the Makefile's ``.venv-crewai``).

Guarantees:

- *Cancellation closes the request.*  Every LLM call is ``LLM.acall`` on ``AsyncOpenAI``
  on the event loop, through :class:`adapters.llm._crewai_agents.AsyncioAgentExecutor`
  (CrewAI's own executor runs its LLM calls with the synchronous client in worker
  threads; why, and what replaces it: that module's docstring).  A halt or a timeout
  cancels the asyncio task and with it the HTTP request; no thread is left running.
- *A halt stops the generation.*  Every LLM call streams (CrewAI's own streaming of its
  native provider, usage in the last chunk), so the server sees its client go away and
  stops generating; ``stream=False`` for a server that cannot stream (it then generates
  to ``max_tokens`` after a halt).  A stream that ends without ``[DONE]`` fails in the
  HTTP guard, never a truncated answer; CrewAI reads the stream with the SDK, so a stream
  broken after some content is retried as a connection failure (the OpenAI orchestrator's
  own reader does not retry it).
- *A server is bounded* as for the OpenAI orchestrator (:mod:`adapters.llm.http_guard`, every
  agent's HTTP client): ``timeout_s`` bounds each attempt from connection to last byte,
  a body over ``max_response_bytes`` (wire or inflated) or an answer over
  ``max_content_chars`` is refused, a redirect is refused, never followed.
- *Retries are ours.*  The SDK's retries and CrewAI's whole-task retries are off; one LLM
  call is retried as :class:`~adapters.llm.openai_chat.OpenAIChatOrchestrator` retries:
  timeouts, connection failures, 408, 429 (``Retry-After``, capped) and 5xx, with
  decorrelated jitter.  401/403, other 4xx, malformed responses and CrewAI's own errors
  fail at once.  Every failure is an :class:`~kernel.AgentInvocationError` naming the
  agent, never the key or the content.
- *Telemetry is off* unless ``telemetry=True``: CrewAI's switches are set in the
  environment (:data:`TELEMETRY_OFF`, process-wide, before crewai is imported) and,
  while the orchestrator is open, CrewAI's event listeners (its console panels, its
  telemetry and trace collection) are detached from its event bus.  Nothing is sent,
  nothing is printed, no event-bus thread starts.  ``telemetry=True`` leaves the
  environment and the listeners as CrewAI has them (its console output included).
- *Nothing of CrewAI's on the root logger* while the orchestrator is open: CrewAI logs
  server error bodies (which may echo an API key) and token usage with
  ``logging.error(...)``; a filter on the root logger drops the records CrewAI's code
  emits there.  Named loggers (``crewai.*``) are left alone.
- *Set-up on entry.*  :meth:`aopen` (the bridge calls it) imports crewai and builds every
  agent, its executor and the HTTP clients in a worker thread; the first batch builds
  nothing.  :meth:`aclose` closes the HTTP clients.
- *A hedge is a real second request.*  Each member has two CrewAI agents (a CrewAI
  executor runs one task at a time): a call and its hedge run at once, each with its own
  request; the loser's is closed when the kernel cancels it.

Output: ``content`` is the agent's final answer (CrewAI's ``TaskOutput.raw``);
``metadata`` holds ``framework`` ("crewai"), ``model``, ``role``, the call's token usage
from CrewAI's ``UsageMetrics`` (``prompt_tokens``, ``completion_tokens``,
``total_tokens``, ``cached_prompt_tokens``, ``reasoning_tokens``, ``successful_requests``),
``attempts``, ``latency_ms``, ``rate_limited_ms`` (its waits for turns in the budget),
``http_status`` and ``http_statuses`` (each HTTP call's status, ``"error"`` without an
answer, as the OpenAI orchestrator's); a failure's :class:`~kernel.AgentInvocationError`
carries ``model``, ``attempts``, the statuses and ``latency_ms`` as its ``metadata``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol
from uuid import uuid4

from adapters.llm.http_guard import DEFAULT_MAX_RESPONSE_BYTES
from adapters.llm.openai_chat import AGENT_HEADER, DEFAULT_MAX_CONTENT_CHARS, encode_agent_header
from adapters.llm.policy import (
    KEYLESS,
    RetryPolicy,
    RetrySettings,
    describe_agent,
    endpoint_from_environment,
    endpoint_source,
    key_from_environment,
    over_content_cap,
    system_prompt_for,
    topic_message,
)
from adapters.llm.provider_budget import (
    BudgetAccount,
    ClusterBudget,
    EndpointBudget,
    LimitStats,
    ProviderLimits,
)
from adapters.roster import AgentProfile, Roster, check_base_url
from kernel import AgentInvocationError, AgentOutput, ContextBundle, InvalidRequestError
from kernel.validate import check_int, check_seconds

if TYPE_CHECKING:
    from crewai import Agent

    from adapters.llm._crewai_agents import AsyncOnlyOpenAI

__all__ = ["DEFAULT_EXPECTED_OUTPUT", "TELEMETRY_OFF", "CrewAIOrchestrator", "disable_telemetry"]

#: What each agent's task asks for, unless ``expected_output`` says otherwise.
DEFAULT_EXPECTED_OUTPUT = (
    "Your position on the topic in a few sentences: what you recommend, and why."
)
#: CrewAI's off switches (its telemetry, its tracing, its version check, and the
#: OpenTelemetry SDK it sends telemetry with), set when ``telemetry=False``.
TELEMETRY_OFF: Mapping[str, str] = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}
_DEFAULT_GOAL = "Give the council your position on the topic, and your reasons."
_DEFAULT_BACKSTORY = "A member of a deliberative council of 72."


def disable_telemetry() -> None:
    """Set CrewAI's off switches (:data:`TELEMETRY_OFF`) in this process's environment.

    CrewAI reads them when it is imported and again before each telemetry call, so
    call this before importing crewai; :class:`CrewAIOrchestrator` does, when built
    with ``telemetry=False``.
    """
    os.environ.update(TELEMETRY_OFF)


class _HttpClient(Protocol):
    """What this module needs of an HTTP client (``httpx.AsyncClient``): closing it."""

    async def aclose(self) -> None: ...


#: CrewAI agents built per council member: one runs a call, the other its hedge (the
#: kernel sends at most one duplicate call of an agent at a time).
_RUNNERS_PER_MEMBER = 2


class _Runner:
    """One CrewAI agent (with its executor) and its own LLM: it runs one call at a time.

    Its own LLM, so that a call's token usage (the delta of the LLM's counters) is that
    call's alone, even while a hedge of the same member runs beside it."""

    __slots__ = ("agent", "llm")

    def __init__(self, agent: Agent, llm: AsyncOnlyOpenAI) -> None:
        self.agent = agent
        self.llm = llm


class _Member:
    """One council member: the runners its calls take turns on, and what names it in
    errors.  Only the event loop's thread touches ``idle``."""

    def __init__(
        self,
        runners: list[_Runner],
        model: str,
        where: str,
        role: str,
        budget: EndpointBudget | ClusterBudget,
        max_tokens: int | None,
    ) -> None:
        self.runners = tuple(runners)
        self.idle = list(runners)
        self.model = model
        self.where = where
        self.role = role
        self.budget = budget  # its endpoint's, for its key: every call takes a turn in it
        self.max_tokens = max_tokens


class CrewAIOrchestrator(RetrySettings):
    """Each agent of ``roster`` a real CrewAI agent; an asyncio orchestrator.

    Args:
        roster: who sits on the council; invoking an agent not in it raises
            :class:`~kernel.AgentNotFoundError`.
        base_url: the OpenAI-compatible endpoint (a profile's ``base_url`` overrides it).
            None: ``$OPENAI_BASE_URL``, else the OpenAI API, as the openai SDK does.
        model: the model (a profile's ``model`` overrides it).
        api_key: defaults to ``$OPENAI_API_KEY``; without either, a placeholder is sent
            (local servers need none).  Never logged; redacted in ``repr``.
        timeout_s: each LLM call's wall-clock bound, connection to last byte (a profile's
            ``timeout_s`` overrides it).
        max_tokens, temperature: defaults for profiles that leave them unset.
        telemetry: False (the default) turns CrewAI's telemetry off; see the module
            docstring.
        max_retries, backoff_base_s, backoff_cap_s, retry_after_cap_s, seed: our retries
            of one LLM call, as in :class:`~adapters.llm.openai_chat.OpenAIChatOrchestrator`.
        expected_output: the task's expected output (CrewAI puts it in the prompt).
        max_response_bytes, max_content_chars: the largest response body and the longest
            answer taken, as in :class:`~adapters.llm.openai_chat.OpenAIChatOrchestrator`
            (8 MiB, 1 Mi characters).
        stream: stream every LLM call (the default), so that a halt stops the server's
            generation; False for a server that cannot stream (it then generates on
            after a halt).
        limits: the provider's limits for this key (:class:`ProviderLimits`), as for
            :class:`~adapters.llm.openai_chat.OpenAIChatOrchestrator`: every LLM call,
            retries included, first takes its turn in the endpoint's budget (on the event
            loop, before the call), the one every orchestrator of this process on that
            endpoint and key shares; a 429 pauses the endpoint.  Settled with the usage
            CrewAI counted (estimated when the server reports none).
    """

    def __init__(
        self,
        roster: Roster,
        *,
        base_url: str | None = None,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        max_tokens: int | None = None,
        temperature: float | None = None,
        telemetry: bool = False,
        max_retries: int = 3,
        backoff_base_s: float = 0.25,
        backoff_cap_s: float = 8.0,
        retry_after_cap_s: float = 30.0,
        seed: int | None = None,
        expected_output: str = DEFAULT_EXPECTED_OUTPUT,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        max_content_chars: int = DEFAULT_MAX_CONTENT_CHARS,
        stream: bool = True,
        limits: ProviderLimits | None = None,
    ) -> None:
        if not isinstance(roster, Roster):
            raise InvalidRequestError(f"roster must be a Roster, got {type(roster).__name__}")
        endpoint = check_base_url(endpoint_from_environment(base_url), endpoint_source(base_url))
        if not isinstance(model, str) or not model.strip():
            raise InvalidRequestError("model must be a non-empty string")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise InvalidRequestError("api_key must be a non-empty string or None")
        if not isinstance(telemetry, bool):
            raise InvalidRequestError(f"telemetry must be True or False, got {telemetry!r}")
        if not isinstance(stream, bool):
            raise InvalidRequestError(f"stream must be True or False, got {stream!r}")
        if limits is not None and not isinstance(limits, ProviderLimits):
            raise InvalidRequestError(
                f"limits must be a ProviderLimits or None, got {type(limits).__name__}"
            )
        if not isinstance(expected_output, str) or not expected_output.strip():
            raise InvalidRequestError("expected_output must be a non-empty string")
        # Validate the defaults the way a roster entry is validated.
        AgentProfile(
            agent_id="defaults", temperature=temperature, max_tokens=max_tokens, timeout_s=timeout_s
        )
        self.roster = roster
        self.base_url = endpoint.rstrip("/")
        self.model = model
        self.timeout_s = check_seconds(timeout_s, "timeout_s")
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.telemetry = telemetry
        self._retry = RetryPolicy(
            max_retries=max_retries,
            backoff_base_s=backoff_base_s,
            backoff_cap_s=backoff_cap_s,
            retry_after_cap_s=retry_after_cap_s,
            seed=seed,
        )
        self.seed = seed
        self.expected_output = expected_output
        self.max_response_bytes = check_int(max_response_bytes, "max_response_bytes", at_least=1)
        self.max_content_chars = check_int(max_content_chars, "max_content_chars", at_least=1)
        self.stream = stream
        self._api_key = key_from_environment(api_key)
        self.limits = limits
        self._account = BudgetAccount(self._api_key, limits)
        if not telemetry:
            disable_telemetry()  # before crewai is imported (by prepare(), or anyone)
        self._policy: RetryPolicy | None = None
        self._members: dict[str, _Member] = {}
        self._clients: list[_HttpClient] = []
        self._quiet: contextlib.ExitStack | None = None
        self._prepare_lock = threading.Lock()

    def __repr__(self) -> str:
        key = "none" if self._api_key == KEYLESS else "***"
        return (
            f"CrewAIOrchestrator(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key={key}, agents={len(self.roster)}, telemetry={self.telemetry})"
        )

    # ------------------------------------------------------------ lifecycle

    def prepare(self) -> None:
        """Import crewai and build every agent, executor and HTTP client; no network call.

        Synchronous (crewai's import alone takes a second or two): run it in a worker
        thread, as :meth:`aopen` does.  Idempotent.
        """
        with self._prepare_lock:
            if self._policy is not None:
                return
            if not self.telemetry:
                disable_telemetry()
            from adapters.llm import _crewai_agents as crew  # imports crewai: seconds

            policy = self._retry
            quiet = contextlib.ExitStack()  # first: nothing of CrewAI's is heard from here on
            try:
                quiet.enter_context(crew.quiet_root_logger())
                if self.telemetry:
                    crew.start_event_bus()  # not on the trio thread: see there
                else:
                    quiet.enter_context(crew.muted_event_bus())
                members = {p.agent_id: self._build_member(p) for p in self.roster}
                crew.warm_up()
            except BaseException:
                quiet.close()
                raise
            self._quiet = quiet
            self._members, self._policy = members, policy

    def _build_member(self, profile: AgentProfile) -> _Member:
        from adapters.llm import _crewai_agents as crew

        model = profile.model or self.model
        base_url = (profile.base_url or self.base_url).rstrip("/")
        timeout_s = profile.timeout_s or self.timeout_s
        client = crew.agent_http_client(timeout_s, self.max_response_bytes)
        self._clients.append(client)
        temperature = profile.temperature if profile.temperature is not None else self.temperature
        settings: dict[str, Any] = {}
        if temperature is not None:
            settings["temperature"] = temperature
        if profile.max_tokens or self.max_tokens:
            settings["max_tokens"] = profile.max_tokens or self.max_tokens
        role = profile.role or profile.name
        system_prompt = profile.system_prompt and system_prompt_for(
            profile.system_prompt, agent_id=profile.agent_id, name=profile.name
        )

        def runner() -> _Runner:
            llm = crew.AsyncOnlyOpenAI(
                model=model,
                provider="openai",
                custom_openai=True,  # an OpenAI-compatible server: no fallback to other APIs
                base_url=base_url,
                api_key=self._api_key,
                max_retries=0,  # ours, not the SDK's
                timeout=timeout_s,
                default_headers={AGENT_HEADER: encode_agent_header(profile.agent_id)},
                client_params={"http_client": client},  # the member's runners share a pool
                # Streamed (with usage in the last chunk): closing the stream stops the
                # server's generation; a stream cut short fails in the HTTP guard.
                stream=self.stream,
                **settings,
            )
            agent = crew.build_agent(
                role=role,
                goal=profile.goal or _DEFAULT_GOAL,
                backstory=profile.backstory or _DEFAULT_BACKSTORY,
                system_prompt=system_prompt,
                llm=llm,
            )
            return _Runner(agent, llm)

        where = describe_agent(profile.agent_id, model, base_url, framework="CrewAI")
        runners = [runner() for _ in range(_RUNNERS_PER_MEMBER)]
        budget = self._account.budget(base_url)
        return _Member(runners, model, where, role, budget, settings.get("max_tokens"))

    def limit_stats(self) -> LimitStats:
        """What rate limiting has cost this orchestrator's agents so far."""
        return self._account.stats()

    async def aopen(self) -> None:
        """Set up (:meth:`prepare`) in a worker thread, so the event loop stays free."""
        await asyncio.to_thread(self.prepare)

    async def aclose(self) -> None:
        """Close the HTTP clients; give back CrewAI's listeners and the root logger."""
        clients, self._clients = self._clients, []
        quiet, self._quiet = self._quiet, None
        self._policy, self._members = None, {}
        try:
            for client in clients:
                await client.aclose()
        finally:
            if quiet is not None:
                quiet.close()

    async def check_reachable(self, timeout_s: float | None = None) -> bool:
        """Fail fast on a wrong host or port: probe ``GET /models`` once, exactly as
        :meth:`adapters.llm.openai_chat.OpenAIChatOrchestrator.check_reachable` does (with
        this orchestrator's endpoint, key and timeout): :class:`AgentInvocationError`
        if the endpoint cannot be reached, False if it is silent (busy), else True."""
        from adapters.llm.openai_chat import OpenAIChatOrchestrator

        key = None if self._api_key == KEYLESS else self._api_key
        probe = OpenAIChatOrchestrator(
            self.base_url, self.model, api_key=key, timeout_s=self.timeout_s
        )
        try:
            return await probe.check_reachable(timeout_s)
        finally:
            await probe.aclose()

    # ------------------------------------------------------------ one agent

    async def invoke(self, agent_id: str, context: ContextBundle) -> AgentOutput:
        policy = self._policy
        if policy is None:
            raise RuntimeError(
                "CrewAIOrchestrator is not open: enter it through AsyncioOrchestratorBridge "
                "(or await aopen()) first"
            )
        self.roster.get(agent_id)  # AgentNotFoundError for a stranger
        member = self._members[agent_id]
        if not member.idle:
            raise AgentInvocationError(
                f"{member.where}: already running {len(member.runners)} calls "
                "(a call and its hedge)"
            )
        # A runner goes back only once its call has ended, cancellation included.
        runner = member.idle.pop()
        try:
            return await self._run(agent_id, member, runner, context, policy)
        finally:
            member.idle.append(runner)

    async def _run(
        self,
        agent_id: str,
        member: _Member,
        runner: _Runner,
        context: ContextBundle,
        policy: RetryPolicy,
    ) -> AgentOutput:
        from adapters.llm import _crewai_agents as crew  # imported by prepare(): no I/O here

        run = crew.AgentRun(
            agent_id,
            member.where,
            policy,
            self._api_key,
            budget=member.budget,
            account=self._account,
            max_tokens=member.max_tokens,
        )
        task = crew.build_task(runner.agent, topic_message(context), self.expected_output)
        before = runner.llm.get_token_usage_summary()
        started = time.perf_counter()
        try:
            content = await crew.run_task(runner.agent, task, run)
        except AgentInvocationError as exc:
            exc.metadata = run.report(member.model, started)
            raise
        except Exception as exc:
            described = crew.describe_error(exc).replace(self._api_key, "***")
            error = AgentInvocationError(
                f"{member.where}: CrewAI error: {described}",
                metadata=run.report(member.model, started),
            )
            raise error from None
        if len(content) > self.max_content_chars:
            raise over_content_cap(member.where, self.max_content_chars)
        usage = runner.llm.get_token_usage_summary().delta_since(before)
        metadata: dict[str, str | int | float] = {
            "framework": "crewai",
            "role": member.role,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "cached_prompt_tokens": usage.cached_prompt_tokens,
            "reasoning_tokens": usage.reasoning_tokens,
            "successful_requests": usage.successful_requests,
            **run.report(member.model, started),
            "rate_limited_ms": round(run.waited_s * 1000.0, 3),
        }
        return AgentOutput(
            agent_id=agent_id, request_id=uuid4(), content=content, metadata=metadata
        )
