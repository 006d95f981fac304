"""CrewAI agents whose every LLM call is asyncio: the executor and the LLM that
:class:`adapters.llm.crewai.CrewAIOrchestrator` builds its agents with.

Imports crewai, so it is imported only by ``CrewAIOrchestrator.prepare()`` (in a worker
thread, after the telemetry switches are set in the environment), never at start-up.

Why not CrewAI's default executor (crewai 1.15, read from its source; crewAI issue 6683):
``Agent.aexecute_task`` / ``akickoff`` run :class:`crewai.agents.agent_executor.AgentExecutor`,
a ``Flow`` whose steps are synchronous methods that the flow runs with
``asyncio.to_thread``; its LLM step calls ``LLM.call``, the *synchronous* OpenAI client.
Cancelling the asyncio task then abandons a worker thread that keeps its HTTP request
open until the server answers.  CrewAI also has the asyncio half of that step
(``crewai.utilities.agent_utils.aget_llm_response`` -> ``LLM.acall`` -> ``AsyncOpenAI``),
unused by its executor.  :class:`AsyncioAgentExecutor` is CrewAI's executor with its
``ainvoke`` run on that half: the same prompt set-up (``_setup_messages``), the same
hooks, the same parsing (``process_llm_response``), every await on the event loop, no
thread, no flow.  Cancelling it cancels the ``AsyncOpenAI`` request, which closes its
connection.

:class:`AsyncOnlyOpenAI` is CrewAI's native OpenAI provider (``OpenAICompletion``, no
LiteLLM) without a synchronous client at all, so no code path can fall back to one
unnoticed: a synchronous call raises.

Retries: CrewAI has three layers of its own, all off here: the SDK's (``max_retries=0`` on
the provider), the agent's whole-task retry (``max_retry_limit=0``), and a rate-limit
retry wrapped around every ``LLM.acall`` (3 attempts, 1-8 s backoff; it stands aside when
a retry is already active around the call, which :meth:`AsyncioAgentExecutor._call_llm`
declares).  :meth:`AgentRun.retry_delay` retries one LLM call the way
:class:`adapters.llm.openai_chat.OpenAIChatOrchestrator` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import openai
from crewai import Agent, Task
from crewai.agents.agent_executor import AgentExecutor
from crewai.agents.parser import AgentFinish
from crewai.events.event_bus import crewai_event_bus
from crewai.events.event_context import EventContextConfig, MismatchBehavior
from crewai.events.event_context import _event_context_config as _EVENT_CONTEXT
from crewai.llms.providers.openai.completion import OpenAICompletion
from crewai.llms.retry import _active_llm_rate_limit_retry as _ACTIVE_RATE_LIMIT_RETRY
from crewai.types.usage_metrics import UsageMetrics
from crewai.utilities.agent_utils import aget_llm_response, format_answer, process_llm_response
from crewai.utilities.i18n import I18N_DEFAULT
from crewai_core.printer import PRINTER
from pydantic import BaseModel, PrivateAttr, ValidationError

from adapters.llm.http_guard import guarded_client, refusal_in
from adapters.llm.openai_chat import estimate_tokens
from adapters.llm.policy import (
    MAX_QUOTED_CHARS,
    Backoff,
    RetryPolicy,
    classify_failure,
    malformed,
    not_retried,
    rate_limited,
)
from adapters.llm.provider_budget import BudgetAccount, ClusterBudget, EndpointBudget, Ticket
from adapters.llm.ratelimit_headers import RateLimitHeaders, retry_after_s
from kernel import AgentInvocationError
from kernel.validate import utf8_size

__all__ = [
    "AgentRun",
    "CouncilAgent",
    "AsyncOnlyOpenAI",
    "AsyncioAgentExecutor",
    "UsageMetrics",
    "build_agent",
    "describe_error",
    "build_task",
    "muted_event_bus",
    "quiet_root_logger",
    "run_task",
    "start_event_bus",
    "agent_http_client",
    "warm_up",
]

# How CrewAI's LLM step says that an LLM call answered nothing (crewai 1.15).
_EMPTY_ANSWER = "Invalid response from LLM call - None or empty"


class AsyncOnlyOpenAI(OpenAICompletion):
    """CrewAI's native OpenAI-compatible provider with no synchronous client.

    Its ``AsyncOpenAI`` client is built from the provider's own settings; pass
    ``client_params={"http_client": ...}`` to give it an HTTP client you close yourself.
    """

    def _build_sync_client(self) -> Any:
        return None  # the provider builds both clients eagerly; this one never exists

    def _get_sync_client(self) -> Any:
        raise RuntimeError(
            "CrewAIOrchestrator runs CrewAI on asyncio only: a synchronous LLM call "
            "(which would block a worker thread that cancellation cannot stop) is refused"
        )


class AgentRun:
    """One invocation of one agent: what names it in errors, its attempts so far, and the
    rate-limit budget every attempt takes its turn in (``account`` counts the cost)."""

    def __init__(
        self,
        agent_id: str,
        where: str,
        policy: RetryPolicy,
        api_key: str,
        *,
        budget: EndpointBudget | ClusterBudget,
        account: BudgetAccount,
        max_tokens: int | None,
    ) -> None:
        self.agent_id = agent_id
        self.where = where
        self.policy = policy
        self.attempts = 0
        self.budget = budget
        self.account = account
        self.max_tokens = max_tokens
        self.waited_s = 0.0  # for its turns in the budget, every attempt
        #: Each HTTP call's status (``"error"``: no answer), for the call's metadata.
        self.statuses: list[str] = []
        self._api_key = api_key
        self._backoff: Backoff = policy.backoff()

    async def take_turn(self, messages: list[Any]) -> Ticket:
        """Wait (on this event loop, before the call is made) for the attempt's turn in
        the budget: one request and its estimated tokens."""
        ticket = await self.budget.acquire(estimate_tokens(messages, self.max_tokens))
        self.waited_s += ticket.waited_s
        self.account.count(waited_s=ticket.waited_s)
        return ticket

    def report(self, model: str, started: float) -> dict[str, str | int | float]:
        """What this run's calls were, as an output's or an error's metadata (no content)."""
        return {
            "model": model,
            "attempts": self.attempts,
            "http_status": self.statuses[-1] if self.statuses else "error",
            "http_statuses": " ".join(self.statuses),
            "latency_ms": round((time.perf_counter() - started) * 1000.0, 3),
        }

    def retry_delay(self, exc: BaseException) -> float | AgentInvocationError:
        """Seconds to wait before the next attempt after ``exc``, or the error that ends
        the run if it is final (for the caller to raise out of its except block: chained
        to ``exc``, it would keep the failed response alive).

        Classified as the OpenAI orchestrator classifies (:func:`classify_failure`):
        retried are timeouts, connection failures, HTTP 408, a rate-limit 429 (at least
        ``Retry-After``, capped) and 5xx; not retried are other HTTP statuses, a 429 out
        of quota, malformed responses, a response the HTTP client refused (over a cap, a
        redirect), anything else CrewAI raises.  The error names the agent, never the key
        or content.
        """
        error = _openai_error(exc)
        status = error.status_code if isinstance(error, openai.APIStatusError) else "error"
        self.statuses.append(str(status))
        refused = refusal_in(exc)
        if refused is not None:
            return not_retried(f"{self.where}: {refused}")
        failure = None
        if isinstance(error, openai.OpenAIError):
            failure = classify_failure(error, self.where, self._api_key)
        if failure is None:
            if isinstance(error, openai.APIResponseValidationError) or _is_json_error(exc):
                return malformed(self.where, "not a chat completion")
            if isinstance(exc, ValueError) and _EMPTY_ANSWER in str(exc):
                # CrewAI's words for a stream that brought no content (a server that
                # answered a stream request with no events at all, a JSON body).
                return malformed(self.where, "no content")
            if isinstance(exc, RecursionError) or isinstance(error, RecursionError):
                return malformed(self.where, "JSON nested too deeply")
            described = describe_error(exc).replace(self._api_key, "***")
            return AgentInvocationError(f"{self.where}: CrewAI error: {described}")
        what, throttled, final = failure
        if final is not None:
            return final
        retry_after: float | None = None
        if throttled and isinstance(error, openai.APIStatusError):
            retry_after = retry_after_s(error.response.headers)
        if self.policy.exhausted(self.attempts):
            return self.policy.gave_up(self.where, what, self.attempts)
        sleep_s = self._backoff.next_s()
        if throttled:
            return self.policy.throttled_wait_s(sleep_s, retry_after)
        return sleep_s


class AsyncioAgentExecutor(AgentExecutor):
    """CrewAI's agent executor, its LLM step on asyncio (``LLM.acall``), no worker thread.

    Runs what CrewAI's executor runs for an agent without tools: the prompt
    (``_setup_messages``: role, goal, backstory, the task), the profile's system prompt
    put first, one LLM call through CrewAI's before/after hooks, CrewAI's parser.  If
    the model answers with a tool call (it has no tools), it is asked once more for its
    final answer with CrewAI's own "force final answer" prompt.  The synchronous
    ``invoke`` is refused: it is the thread-based path this class exists to avoid.
    """

    _run: AgentRun | None = PrivateAttr(default=None)
    _system_prompt: str | None = PrivateAttr(default=None)

    def use_system_prompt(self, system_prompt: str | None) -> None:
        """Put ``system_prompt`` before CrewAI's own system message on every run."""
        self._system_prompt = system_prompt

    def invoke(self, inputs: dict[str, Any]) -> Any:
        raise RuntimeError(
            "AsyncioAgentExecutor runs on asyncio only: use Task.aexecute_sync / "
            "Agent.aexecute_task (the synchronous path runs LLM calls in worker threads)"
        )

    async def ainvoke(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return await self.invoke_async(inputs)

    async def invoke_async(self, inputs: dict[str, Any]) -> dict[str, Any]:
        run = self._run
        if run is None:
            raise RuntimeError("AsyncioAgentExecutor.invoke_async outside an agent run")
        state = self.state
        state.messages.clear()
        state.iterations = 0
        state.current_answer = None
        state.is_finished = False
        self._setup_messages(inputs)
        if self._system_prompt:
            _prepend_system_prompt(state.messages, self._system_prompt)
        answer = await self._answer(run)
        state.current_answer = answer
        state.is_finished = True
        return {"output": answer.output}

    async def _answer(self, run: AgentRun) -> AgentFinish:
        raw = await self._call_llm(run)
        if isinstance(raw, BaseModel):  # structured output (a task with a response model)
            return AgentFinish(thought="", output=raw, text=raw.model_dump_json())
        parsed = process_llm_response(str(raw), self.use_stop_words)
        if isinstance(parsed, AgentFinish):
            return parsed
        # A tool call, and a council member has no tools: ask once for the final answer,
        # as CrewAI's executor does when its iterations run out.
        self._append_message_to_state(str(raw), role="assistant")
        self._append_message_to_state(I18N_DEFAULT.errors("force_final_answer"), role="user")
        again = format_answer(str(await self._call_llm(run)))
        if isinstance(again, AgentFinish):
            return again
        return AgentFinish(thought=again.thought, output=again.text, text=again.text)

    async def _call_llm(self, run: AgentRun) -> Any:
        llm = self.llm
        if llm is None:
            raise RuntimeError("AsyncioAgentExecutor has no LLM (build it with build_agent)")
        while True:
            run.attempts += 1
            self.state.iterations += 1
            messages = list(self.state.messages)
            ticket = await run.take_turn(messages)
            before = llm.get_token_usage_summary()
            report: RateLimitHeaders | None = None
            used: float | None = None
            throttled = False
            paused: float | None = None
            # CrewAI wraps every LLM.acall in a rate-limit retry of its own (3 attempts,
            # 1 s, 2 s backoff, Retry-After read from no openai response): it skips it
            # when a retry is already active around the call.  Ours is.
            outer_retry = _ACTIVE_RATE_LIMIT_RETRY.set(True)
            try:
                answer = await aget_llm_response(
                    llm=llm,
                    messages=messages,
                    callbacks=self.callbacks,
                    printer=PRINTER,
                    from_task=self.task,
                    from_agent=self.agent,
                    executor_context=self,
                    verbose=False,
                )
                run.statuses.append("200")  # an answer: the endpoint's success status
                usage = llm.get_token_usage_summary().delta_since(before)
                used = _used_tokens(messages, answer, usage)
                return answer
            except Exception as exc:
                error = _openai_error(exc)
                if isinstance(error, openai.APIStatusError):
                    report = RateLimitHeaders.parse(error.response.headers)
                    throttled = rate_limited(error)
                delay = run.retry_delay(exc)
            finally:
                _ACTIVE_RATE_LIMIT_RETRY.reset(outer_retry)
                # Whatever the outcome (an answer, an error, a cancellation): settled
                # with the usage CrewAI counted, the headers of an error answer, a 429.
                paused = run.budget.finish(
                    ticket,
                    report,
                    used_tokens=used,
                    throttled=throttled,
                    max_pause_s=run.policy.retry_after_cap_s,
                )
            if isinstance(delay, AgentInvocationError):
                raise delay  # out of the except block: see retry_delay
            if throttled:
                # The whole endpoint waits, not this agent alone: for the reset the
                # answer gave (done by the budget), else for our delay.  Our next turn
                # in the budget comes after it.
                run.account.count(throttled=True)
                if paused is None:
                    run.budget.pause(delay)
                delay = 0.0
            await asyncio.sleep(delay)

    @contextlib.contextmanager
    def running(self, run: AgentRun) -> Iterator[None]:
        """Mark this executor busy with ``run`` (an agent runs once at a time)."""
        if self._run is not None:
            raise AgentInvocationError(f"{run.where}: already running")
        self._run = run
        try:
            yield
        finally:
            self._run = None


class CouncilAgent(Agent):
    """A CrewAI ``Agent`` that does not look for trained-agent data.

    CrewAI's ``aexecute_task`` reads ``trained_agents_data.pkl`` from the working
    directory on every task (a file read on the event loop, and a pickle unpickled from
    wherever the process happens to run) to append "trained" suggestions to the prompt.
    A council member's prompt is its profile and the topic, nothing else.
    """

    def _use_trained_data(self, task_prompt: str) -> str:
        return task_prompt


def build_agent(
    *,
    role: str,
    goal: str,
    backstory: str,
    system_prompt: str | None,
    llm: AsyncOnlyOpenAI,
) -> Agent:
    """A CrewAI agent with an :class:`AsyncioAgentExecutor`, its executor built now.

    Off: delegation (no co-workers), CrewAI's whole-task retries, its context-window
    summarising (it runs in a worker thread), caching, verbose output.
    """
    agent = CouncilAgent(
        role=role,
        goal=goal,
        backstory=backstory,
        llm=llm,
        executor_class=AsyncioAgentExecutor,
        allow_delegation=False,
        max_retry_limit=0,
        respect_context_window=False,
        cache=False,
        verbose=False,
    )
    agent.create_agent_executor()
    executor = agent.agent_executor
    assert isinstance(executor, AsyncioAgentExecutor)
    executor.use_system_prompt(system_prompt)
    return agent


def build_task(agent: Agent, description: str, expected_output: str) -> Task:
    return Task(description=description, expected_output=expected_output, agent=agent)


async def run_task(agent: Agent, task: Task, run: AgentRun) -> str:
    """Run ``task`` with ``agent`` on CrewAI's native asyncio path; its final answer.

    ``Agent.aexecute_task``, not ``Task.aexecute_sync``: the task's own wrapper ends every
    run by clearing the task's file store through ``asyncio.run`` in a new thread, which
    the event loop waits for (2-3 ms a task, on the loop, halts included).
    """
    executor = agent.agent_executor
    assert isinstance(executor, AsyncioAgentExecutor)
    # CrewAI pairs its start/end events on a per-task scope stack and prints a warning to
    # stdout when a pair does not match (its OpenAI provider ends a failed call twice).
    # Silent for our runs; the setting is this asyncio task's own (a context variable).
    _EVENT_CONTEXT.set(_QUIET_EVENT_SCOPES)
    with executor.running(run):
        output = await agent.aexecute_task(task)
    return output if isinstance(output, str) else str(output)


_QUIET_EVENT_SCOPES = EventContextConfig(
    mismatch_behavior=MismatchBehavior.SILENT, empty_pop_behavior=MismatchBehavior.SILENT
)


class _Shared:
    """A process-wide change made while at least one orchestrator is open.

    Entered by the first user, left by the last, whatever the order: orchestrators open
    and close independently.
    """

    def __init__(self, make: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._users = 0
        self._active: contextlib.AbstractContextManager[None] | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                active = self._make()
                active.__enter__()
                self._active = active
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._active is not None:
                    active, self._active = self._active, None
                    active.__exit__(None, None, None)


#: CrewAI's own event listeners (console panels that print the task, its telemetry, its
#: trace collection) run in the event bus's worker threads.  With telemetry off they are
#: detached while any orchestrator is open: nothing is printed, collected or sent, and no
#: bus thread starts.  (The bus is a singleton: process-wide.)
muted_event_bus = _Shared(crewai_event_bus.scoped_handlers)


def start_event_bus() -> None:
    """Start CrewAI's event bus now, from this (worker) thread, on a plain asyncio loop.

    With its listeners attached (``telemetry=True``) the bus starts, on its first event,
    worker threads and an asyncio loop of its own: it creates the loop with
    ``asyncio.new_event_loop()`` in the calling thread and runs it in its own thread.
    Once trio-asyncio is imported its event-loop policy answers that call with a loop
    bound to the calling thread (and refuses outright on the trio thread), so every agent
    would fail.  trio-asyncio lets a thread override the policy for itself: this thread
    asks for asyncio's default one while CrewAI builds its loop.  Idempotent.
    """
    from trio_asyncio import _loop as trio_asyncio_loop

    per_thread = trio_asyncio_loop._faked_policy  # thread-local: this thread only
    previous = per_thread.policy
    per_thread.policy = asyncio.DefaultEventLoopPolicy()
    try:
        crewai_event_bus._ensure_executor_initialized()
    finally:
        per_thread.policy = previous


class _NoCrewAIRootRecords(logging.Filter):
    """Drops what CrewAI's code logs on the *root* logger (``logging.error(...)``): the
    server's error body (which may echo part of an API key), token usage, prompts.  The
    agent's failure, without those, is the :class:`~kernel.AgentInvocationError`."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self._folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and record.pathname.startswith(self._folder))


@contextlib.contextmanager
def _filtered_root_logger() -> Iterator[None]:
    import crewai

    root = logging.getLogger()
    keep_out = _NoCrewAIRootRecords(os.path.dirname(crewai.__file__) + os.sep)
    root.addFilter(keep_out)
    try:
        yield
    finally:
        root.removeFilter(keep_out)


#: Applied while any orchestrator is open, telemetry or not.
quiet_root_logger = _Shared(_filtered_root_logger)


# What the first LLM call would otherwise do on the event loop (~0.4 s, measured): import
# the SDK's resource modules and anyio's asyncio backend, and build the pydantic models
# (CrewAI's events, the SDK's chat completion types) that pydantic builds on first use.
_LAZY_MODULES = (
    "anyio._backends._asyncio",
    "openai.resources",
    "crewai.hooks.contexts",
    "crewai.llms.cache",
)
_LAZY_MODEL_MODULES = ("crewai.events.types", "openai.types.chat")


def warm_up() -> None:
    """Do now, in this (worker) thread, what the first agent run would do lazily.

    Best effort: a module that is not there (another version) is skipped, and so is a
    model that cannot be built yet.  No network call.
    """
    for name in _LAZY_MODULES:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith(_LAZY_MODEL_MODULES):
            continue
        for value in list(vars(module).values()):
            if (
                isinstance(value, type)
                and issubclass(value, BaseModel)
                and value is not BaseModel
                and not value.__pydantic_complete__
            ):
                with contextlib.suppress(Exception):
                    value.model_rebuild()


def agent_http_client(timeout_s: float, max_response_bytes: int) -> httpx2.AsyncClient:
    """One agent's HTTP client (its own connection pool, as CrewAI gives each LLM): the
    guarded one (:mod:`adapters.llm.http_guard`), which this environment's SDK takes too.

    Not one pool for all: httpcore's pool checks every pooled connection on every
    request event, so 72 agents on one pool cost ~5x the CPU of 72 small pools
    (measured with httpcore 1.x: 10.8 against 2.0 ms per agent, keep-alive).
    """
    return guarded_client(timeout_s, max_response_bytes)


# ---------------------------------------------------------------- helpers


def _used_tokens(messages: list[Any], answer: object, usage: UsageMetrics) -> float:
    """The tokens one call used: as CrewAI counted them from the server's ``usage``, else
    (a server that reports none) estimated from the messages and the answer."""
    if usage.successful_requests > 0 and usage.total_tokens > 0:
        return float(usage.total_tokens)
    return float(estimate_tokens(messages, 0) + math.ceil(utf8_size(str(answer)) / 4))


def _prepend_system_prompt(messages: list[Any], system_prompt: str) -> None:
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") == "system":
        first["content"] = f"{system_prompt}\n\n{first.get('content') or ''}"
    else:
        messages.insert(0, {"role": "system", "content": system_prompt})


def _openai_error(exc: BaseException) -> BaseException:
    """The openai SDK error under what CrewAI raised (it wraps some), else ``exc``.

    A transport error raised while a stream is read (the SDK's streams of openai 2 do not
    wrap them) stands for the SDK error it would have been: a timeout, or a connection
    failure (a reset, a stream cut short)."""
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; bounded all the same
        if seen is None:
            break
        if isinstance(seen, openai.OpenAIError):
            return seen
        if isinstance(seen, httpx2.TransportError):
            request: Any = seen.request  # openai 2 types it as httpx's; it takes httpx2's
            if isinstance(seen, httpx2.TimeoutException):
                return openai.APITimeoutError(request=request)
            return openai.APIConnectionError(request=request)
        seen = seen.__cause__ or seen.__context__
    return exc


def _is_json_error(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ValueError) and type(seen).__name__ == "JSONDecodeError":
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def describe_error(exc: BaseException) -> str:
    """``Type: message``, one line, bounded; a validation error by its type and count only
    (pydantic quotes the input, which may be a prompt or an answer)."""
    if isinstance(exc, ValidationError):
        return f"{type(exc).__name__} ({exc.error_count()} error(s))"
    text = " ".join(str(exc).split())[:MAX_QUOTED_CHARS]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
