"""What ``conclave deliberate`` runs on: the halt channels, the orchestrator, the witness
and the metrics server, assembled into one :class:`~kernel.ConcurrentDeliberationService`.

Set-up only: every setting is an explicit parameter (nothing here knows argparse), and
every resource is opened by an async context manager that closes it on the way out.
A mistake that only shows when something is opened (a server that cannot be reached, a
metrics port that is taken) raises :class:`UsageError`; nothing has run by then.

The optional pieces import their libraries where they are used, so the stub backend
never loads openai, trio-asyncio, sqlite3 or prometheus-client.
"""

from __future__ import annotations

import importlib.util
import os
import random
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio

from adapters.cli._display import plain
from adapters.roster import Roster
from adapters.stub import AgentOrchestratorStub, LatencyModel
from kernel import (
    DEFAULT_HALT_READ_TIMEOUT,
    AgentInvocationError,
    AgentOrchestratorProtocol,
    AgentPool,
    ConclaveError,
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltChecker,
    HaltSwitch,
    InvalidRequestError,
    read_halt,
)

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.openai_chat import OpenAIChatOrchestrator
    from adapters.llm.provider_budget import LimitStats, ProviderLimits, SharedBudgetStore

__all__ = [
    "OpeningHaltWatch",
    "OperatorInterrupt",
    "RateLimitReport",
    "UsageError",
    "crewai_orchestrator",
    "EXTRAS",
    "MetricsPush",
    "importing_extra",
    "require_extra",
    "halt_checker",
    "halt_reason_now",
    "open_service",
    "openai_orchestrator",
    "stub_orchestrator",
]


class UsageError(Exception):
    """Bad usage or input: one line on stderr, exit 2.

    It lives here, the lowest of the CLI's modules, because set-up raises it too.
    """


# ---------------------------------------------------------------- optional parts

#: The CLI's optional parts: the extra that installs each, and the modules it brings.
EXTRAS: dict[str, tuple[str, ...]] = {
    "llm": ("trio_asyncio", "openai"),
    "valkey": ("coredis",),
    "metrics": ("prometheus_client",),
    "otel": ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"),
    "crewai": ("crewai", "trio_asyncio", "openai"),
    "plot": ("matplotlib",),
}


def require_extra(extra: str, flag: str) -> None:
    """:class:`UsageError` naming the extra to install unless every module ``extra``
    brings is there.  Checked before anything runs, without importing them."""
    for module in EXTRAS[extra]:
        if importlib.util.find_spec(module) is None:
            raise UsageError(_install_hint(extra, flag, module))


@contextmanager
def importing_extra(extra: str, flag: str) -> Iterator[None]:
    """Around the imports of an optional part: a module that cannot be found (also one
    the extra's own modules need: a broken install) is the same :class:`UsageError`."""
    try:
        yield
    except ModuleNotFoundError as exc:
        raise UsageError(_install_hint(extra, flag, exc.name or "a module")) from None


def _install_hint(extra: str, flag: str, module: str) -> str:
    if extra == "crewai":
        return (
            f"{flag} needs {module}, in an environment of its own (crewai pins openai<3): "
            "pip install 'conclave-kernel[crewai]', or make setup-crewai"
        )
    return f"{flag} needs {module}: pip install 'conclave-kernel[{extra}]'"


# ---------------------------------------------------------------- halt channels


class OperatorInterrupt:
    """Ctrl-C (or SIGTERM) raises the halt: a clean stop with a partial summary.

    A second one stops waiting for the clean halt (``KeyboardInterrupt``, exit 130).
    """

    def __init__(self) -> None:
        self.switch = HaltSwitch()
        self.signal_name: str | None = None  # the first signal's, once one came

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()  # from here on, Ctrl-C means "halt", not KeyboardInterrupt
            async for signum in signals:
                if self.signal_name is not None:
                    raise KeyboardInterrupt  # second Ctrl-C: stop waiting for a clean halt
                self.signal_name = signal.Signals(signum).name
                self.switch.halt(f"operator interrupt ({self.signal_name})")


def halt_checker(switch: HaltSwitch, halt_file: Path | None) -> HaltChecker:
    """The run's halt: ``switch`` alone, or with ``halt_file`` (either one halts)."""
    if halt_file is None:
        return switch
    from adapters.halt.file import FileHaltChannel

    return DualChannelHaltChecker(switch, FileHaltChannel(halt_file, poll_interval=0.02))


async def halt_reason_now(checker: HaltChecker) -> str | None:
    """The halt reason if the system is halted now, else None (CT-11 before the start).

    Fail-safe like the kernel: a read that raises, or does not answer within
    :data:`kernel.DEFAULT_HALT_READ_TIMEOUT`, counts as halted.
    """
    try:
        return await read_halt(checker, DEFAULT_HALT_READ_TIMEOUT)
    except Exception as exc:
        return f"halt channel unreadable ({type(exc).__name__}); treated as halted"


class OpeningHaltWatch:
    """The halt while the backend opens: a halt on any channel cancels the opening.

    Opening can take long (the reachability probe waits up to --timeout; CrewAI's
    import takes seconds) and the kernel watches the channels only once the service is
    open.  Polled every :attr:`POLL_S`, fail-safe as :func:`halt_reason_now`.  Owns the
    watching only: what a halt then means is the caller's.
    """

    POLL_S = 0.05

    def __init__(self, checker: HaltChecker, opening: trio.CancelScope) -> None:
        self.reason: str | None = None  # the halt's, once one was seen
        self._checker = checker
        self._opening = opening
        self._watching = trio.CancelScope()

    async def run(self) -> None:
        with self._watching:
            while True:
                reason = await halt_reason_now(self._checker)
                if reason is not None:
                    self.reason = reason
                    self._opening.cancel()
                    return
                await trio.sleep(self.POLL_S)

    def stop(self) -> None:
        """Stop watching (the service is open): even before :meth:`run` has started."""
        self._watching.cancel()


# ---------------------------------------------------------------- orchestrators


@asynccontextmanager
async def stub_orchestrator(
    agent_ids: Sequence[str],
    *,
    latency_ms: float,
    jitter_ms: float,
    fail_rate: float,
    seed: int | None,
    latency_profile: str = "fixed",
) -> AsyncIterator[AgentOrchestratorProtocol]:
    """The trio-native stub; ``round(fail_rate * len(agent_ids))`` agents, drawn with
    ``seed``, fail.  ``latency_profile="lognormal"``: heavy-tailed latencies whose median
    is ``latency_ms`` (:meth:`LatencyModel.with_median`)."""
    rng = random.Random(seed)
    failing = rng.sample(list(agent_ids), round(fail_rate * len(agent_ids)))
    profile: LatencyModel | Literal["fixed"] = (
        LatencyModel().with_median(latency_ms) if latency_profile == "lognormal" else "fixed"
    )
    yield AgentOrchestratorStub(
        latency_ms=latency_ms,
        fail_agents=failing,
        jitter_ms=jitter_ms,
        seed=seed,
        latency_profile=profile,
    )


class RateLimitReport:
    """What rate limiting cost a run's orchestrator, readable once it is open (the
    summary shows it); ``stats()`` is None for a backend without rate limits.
    ``shared``: the budget every replica shares (``--valkey`` with ``--rpm/--tpm``)."""

    def __init__(self, shared: SharedBudgetStore | None = None) -> None:
        self.source: Callable[[], LimitStats] | None = None
        self.shared = shared

    def stats(self) -> LimitStats | None:
        return None if self.source is None else self.source()


@asynccontextmanager
async def openai_orchestrator(
    base_url: str | None,
    model: str,
    *,
    roster: Roster | None,
    max_tokens: int | None,
    timeout_s: float | None,
    limits: ProviderLimits | None = None,
    report: RateLimitReport | None = None,
    check_models: bool = True,
    transport: str = "httpx",
) -> AsyncIterator[AgentOrchestratorProtocol]:
    """An OpenAI-compatible server behind the asyncio bridge, probed once on entry.

    A server that refuses the connection raises :class:`UsageError`; one that stays
    silent for ``timeout_s`` (the orchestrator's default when None) is busy, not gone:
    a warning on stderr, and the run goes on.  Then, with ``check_models``, every model
    the council will ask for is looked up in its endpoint's listing
    (:mod:`adapters.llm.model_listing`): one it does not list is a :class:`UsageError`;
    an endpoint that does not list its models gets a note on stderr and the run goes on.
    ``base_url`` None: ``$OPENAI_BASE_URL``, else the OpenAI API.  ``transport``: the
    HTTP transport under the SDK (``OpenAIChatOrchestrator``'s).  ``limits``: the
    provider's rate limits (``--rpm``/``--tpm``); ``report`` is pointed at the
    orchestrator's rate-limit stats.
    """
    # Imported here: the stub path needs neither openai nor trio-asyncio.
    with importing_extra("llm", "--backend openai"):
        from adapters.llm.bridge import AsyncioOrchestratorBridge
        from adapters.llm.openai_chat import OpenAIChatOrchestrator

    # No timeout_s: the orchestrator's own default, which the probe below waits too.
    timeout: dict[str, Any] = {"timeout_s": timeout_s} if timeout_s else {}
    inner = OpenAIChatOrchestrator(
        base_url,
        model,
        roster=roster,
        max_tokens=max_tokens,
        limits=limits,
        transport=transport,
        **timeout,
    )
    if report is not None:
        report.source = inner.limit_stats
    async with AsyncioOrchestratorBridge(inner) as bridge:
        answered = await _probe(bridge, inner.check_reachable, inner.base_url, inner.timeout_s)
        if check_models and answered:
            await _check_models(bridge, inner)
        yield bridge


async def _check_models(bridge: AsyncioOrchestratorBridge, inner: OpenAIChatOrchestrator) -> None:
    """Refuse a model its endpoint does not list; note an endpoint that lists none."""
    wanted = inner.models_by_endpoint()
    for listing in await bridge.run_asyncio(inner.list_models):
        missing = listing.missing(wanted[listing.base_url])
        if missing:
            raise UsageError(listing.refusal(missing[0]) + "; nothing was run")
        if listing.models is None:
            print(
                f"conclave: note: {listing.base_url}/models did not list the models "
                f"({listing.why}); the model is not checked before the run",
                file=sys.stderr,
                flush=True,
            )


@asynccontextmanager
async def crewai_orchestrator(
    base_url: str | None,
    model: str,
    *,
    roster: Roster,
    max_tokens: int | None,
    timeout_s: float | None,
    limits: ProviderLimits | None = None,
    report: RateLimitReport | None = None,
) -> AsyncIterator[AgentOrchestratorProtocol]:
    """Each agent of ``roster`` a real CrewAI agent (:mod:`adapters.llm.crewai`, telemetry
    off) behind the asyncio bridge; entering imports crewai and builds every agent (a
    worker thread, a second or two), then probes the server as the openai backend does.
    ``limits`` and ``report`` as for :func:`openai_orchestrator`."""
    with importing_extra("crewai", "--backend crewai"):
        from adapters.llm.bridge import AsyncioOrchestratorBridge
        from adapters.llm.crewai import CrewAIOrchestrator

    timeout: dict[str, Any] = {"timeout_s": timeout_s} if timeout_s else {}
    inner = CrewAIOrchestrator(
        roster, base_url=base_url, model=model, max_tokens=max_tokens, limits=limits, **timeout
    )
    if report is not None:
        report.source = inner.limit_stats
    async with AsyncioOrchestratorBridge(inner) as bridge:
        await _probe(bridge, inner.check_reachable, inner.base_url, inner.timeout_s)
        yield bridge


async def _probe(
    bridge: AsyncioOrchestratorBridge,
    check_reachable: Callable[[], Awaitable[bool]],
    base_url: str,
    timeout_s: float,
) -> bool:
    """Probe the endpoint once: unreachable is a :class:`UsageError`; silence (for as
    long as an agent's request would wait: --timeout) is a busy server (llama.cpp), a
    warning on stderr, and the run goes on.  Whether it answered."""
    try:
        answered = await bridge.run_asyncio(check_reachable)
    except AgentInvocationError as exc:
        raise UsageError(str(exc)) from None
    if not answered:
        print(
            f"conclave: warning: {base_url} did not answer within "
            f"{timeout_s:g} s; assuming it is busy and going on",
            file=sys.stderr,
            flush=True,
        )
    return answered


# ---------------------------------------------------------------- the service


class MetricsPush:
    """The run's metrics pushed to a Pushgateway once, when the service closes.

    Each run is a group of its own (``instance``: the host, ``run``: :attr:`run_id`), so
    runs on one host, even at once, never overwrite each other.  The push is bounded
    (``timeout_s``) and shielded from the run's own cancellation (it comes after the
    batch, whose scope is cancelled by then); a failed push is a warning on stderr, never
    the run's failure.
    """

    def __init__(self, url: str, *, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.run_id = uuid.uuid4().hex
        self.problem: str | None = None  # why the push failed, once it has

    async def push(self, registry: CollectorRegistry) -> None:
        from adapters.pushgateway import push_metrics

        key = {"instance": socket.gethostname(), "run": self.run_id}
        with trio.CancelScope(shield=True):
            self.problem = await push_metrics(
                self.url, registry, grouping_key=key, timeout_s=self.timeout_s
            )
        if self.problem is None:
            line = f"metrics pushed to {self.url} (run {self.run_id})"
        else:
            line = f"warning: metrics not pushed to {self.url}: {self.problem}"
        print(f"conclave: {plain(line)}", file=sys.stderr, flush=True)


@asynccontextmanager
async def open_service(
    orchestrator: AbstractAsyncContextManager[AgentOrchestratorProtocol],
    checker: HaltChecker,
    pool: AgentPool,
    *,
    agent_timeout: float | None,
    witness_db: Path | None,
    metrics_port: int | None,
    metrics_push: MetricsPush | None = None,
    tracing: bool = False,
) -> AsyncIterator[ConcurrentDeliberationService]:
    """The service over ``orchestrator``, with a witness log at ``witness_db``, a
    metrics server on ``metrics_port`` and a push of its metrics on the way out
    (``metrics_push``) when given, and OTLP traces with ``tracing`` (or when the
    environment names an OTLP endpoint: :func:`tracing_requested`); all of it closed on
    the way out, in the reverse order."""
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(orchestrator)
        witness = None
        if witness_db is not None:
            from adapters.cli.resume import AnnouncedBatches
            from adapters.witness.sqlite import SqliteWitness

            log = await stack.enter_async_context(SqliteWitness(witness_db))
            witness = AnnouncedBatches(log)
        service = ConcurrentDeliberationService(
            backend, checker, pool, agent_timeout=agent_timeout, witness=witness
        )
        if metrics_port is not None or metrics_push is not None:
            flag = "--metrics-port" if metrics_port is not None else "--metrics-push"
            registry = _registry(service, flag)
            if metrics_port is not None:
                _serve_metrics(registry, metrics_port, stack)
            if metrics_push is not None:
                stack.push_async_callback(metrics_push.push, registry)
        if tracing or tracing_requested():
            await _trace(service, stack, explicit=tracing)
        yield service


#: The standard variables that name an OTLP endpoint: either turns tracing on.
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment names an OTLP endpoint and does not disable the SDK
    (``OTEL_SDK_DISABLED=true``), as every OpenTelemetry SDK reads it."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name, "").strip() for name in OTLP_ENDPOINT_VARIABLES)


async def _trace(
    service: ConcurrentDeliberationService, stack: AsyncExitStack, *, explicit: bool
) -> None:
    """Trace the service (OTLP/HTTP, configured by the OTEL_* variables).  Asked for by
    the environment alone, a missing extra is a warning, not a refusal: the variables
    may be meant for another program."""
    try:
        with importing_extra("otel", "--otel"):
            from adapters.tracing import otlp_tracing
    except UsageError as exc:
        if explicit:
            raise
        print(f"conclave: warning: OTLP endpoint set, not tracing: {exc}", file=sys.stderr)
        return
    try:
        await stack.enter_async_context(otlp_tracing(service))
    except InvalidRequestError as exc:  # an OTEL_* setting the SDK refuses
        if explicit:
            raise UsageError(str(exc)) from None
        print(f"conclave: warning: not tracing: {exc}", file=sys.stderr)


def _registry(service: ConcurrentDeliberationService, flag: str) -> CollectorRegistry:
    """A registry of the service's own metrics (not the process's default one)."""
    with importing_extra("metrics", flag):
        from prometheus_client import CollectorRegistry

        from adapters.prometheus import export_service_metrics
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
    return registry


def _serve_metrics(registry: CollectorRegistry, port: int, stack: AsyncExitStack) -> None:
    with importing_extra("metrics", "--metrics-port"):
        from adapters.prometheus import serve_metrics
    try:
        server, _ = serve_metrics(port, registry=registry)
    except OSError as exc:
        raise UsageError(f"--metrics-port {port}: {exc.strerror or exc}") from None
    except ConclaveError as exc:
        raise UsageError(f"--metrics-port: {exc}") from None
    stack.callback(server.server_close)
    stack.callback(server.shutdown)
    print(
        f"conclave: metrics at http://127.0.0.1:{server.server_port}/metrics",
        file=sys.stderr,
        flush=True,
    )
