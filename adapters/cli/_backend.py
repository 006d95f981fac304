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
import random
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AsyncExitStack,
    asynccontextmanager,
    contextmanager,
)
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import trio

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
    read_halt,
)

if TYPE_CHECKING:
    from adapters.llm.bridge import AsyncioOrchestratorBridge
    from adapters.llm.provider_budget import LimitStats, ProviderLimits

__all__ = [
    "OpeningHaltWatch",
    "OperatorInterrupt",
    "RateLimitReport",
    "UsageError",
    "crewai_orchestrator",
    "EXTRAS",
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
    "crewai": ("crewai", "trio_asyncio", "openai"),
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
    summary shows it); ``stats()`` is None for a backend without rate limits."""

    def __init__(self) -> None:
        self.source: Callable[[], LimitStats] | None = None

    def stats(self) -> LimitStats | None:
        return None if self.source is None else self.source()


@asynccontextmanager
async def openai_orchestrator(
    base_url: str,
    model: str,
    *,
    roster: Roster | None,
    max_tokens: int | None,
    timeout_s: float | None,
    limits: ProviderLimits | None = None,
    report: RateLimitReport | None = None,
) -> AsyncIterator[AgentOrchestratorProtocol]:
    """An OpenAI-compatible server behind the asyncio bridge, probed once on entry.

    A server that refuses the connection raises :class:`UsageError`; one that stays
    silent for ``timeout_s`` (the orchestrator's default when None) is busy, not gone:
    a warning on stderr, and the run goes on.  ``limits``: the provider's rate limits
    (``--rpm``/``--tpm``); ``report`` is pointed at the orchestrator's rate-limit stats.
    """
    # Imported here: the stub path needs neither openai nor trio-asyncio.
    with importing_extra("llm", "--backend openai"):
        from adapters.llm.bridge import AsyncioOrchestratorBridge
        from adapters.llm.openai_chat import OpenAIChatOrchestrator

    # No timeout_s: the orchestrator's own default, which the probe below waits too.
    timeout: dict[str, Any] = {"timeout_s": timeout_s} if timeout_s else {}
    inner = OpenAIChatOrchestrator(
        base_url, model, roster=roster, max_tokens=max_tokens, limits=limits, **timeout
    )
    if report is not None:
        report.source = inner.limit_stats
    async with AsyncioOrchestratorBridge(inner) as bridge:
        await _probe(bridge, inner.check_reachable, inner.base_url, inner.timeout_s)
        yield bridge


@asynccontextmanager
async def crewai_orchestrator(
    base_url: str,
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
) -> None:
    """Probe the endpoint once: unreachable is a :class:`UsageError`; silence (for as
    long as an agent's request would wait: --timeout) is a busy server (llama.cpp), a
    warning on stderr, and the run goes on."""
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


# ---------------------------------------------------------------- the service


@asynccontextmanager
async def open_service(
    orchestrator: AbstractAsyncContextManager[AgentOrchestratorProtocol],
    checker: HaltChecker,
    pool: AgentPool,
    *,
    agent_timeout: float | None,
    witness_db: Path | None,
    metrics_port: int | None,
) -> AsyncIterator[ConcurrentDeliberationService]:
    """The service over ``orchestrator``, with a witness log at ``witness_db`` and a
    metrics server on ``metrics_port`` when given; all of it closed on the way out,
    in the reverse order."""
    async with AsyncExitStack() as stack:
        backend = await stack.enter_async_context(orchestrator)
        witness = None
        if witness_db is not None:
            from adapters.witness.sqlite import SqliteWitness

            witness = await stack.enter_async_context(SqliteWitness(witness_db))
        service = ConcurrentDeliberationService(
            backend, checker, pool, agent_timeout=agent_timeout, witness=witness
        )
        if metrics_port is not None:
            _serve_metrics(service, metrics_port, stack)
        yield service


def _serve_metrics(
    service: ConcurrentDeliberationService, port: int, stack: AsyncExitStack
) -> None:
    with importing_extra("metrics", "--metrics-port"):
        from prometheus_client import CollectorRegistry

        from adapters.prometheus import export_service_metrics, serve_metrics
    registry = CollectorRegistry()
    export_service_metrics(service, registry)
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
