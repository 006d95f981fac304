"""``conclave``: run a deliberation an operator can watch and stop; manage the halt file.

    conclave deliberate [--backend stub|openai|crewai] [--agents N | --roster FILE] ...
    conclave load   --batches N [deliberate's run flags] [--json FILE|-] [--png FILE]
    conclave halt   --halt-file PATH [--create] | --valkey URL --reason TEXT
    conclave clear  --halt-file PATH | --valkey URL --approver A --approver B --reason TEXT
    conclave clear  ... --allowed-signers FILE --approval A.json --approval B.json --reason TEXT
    conclave approve --halt-file PATH | --valkey URL --key KEY --principal NAME [--out FILE]
    conclave status --halt-file PATH | --valkey URL
    conclave verify DB

Exit codes:

    0    every agent succeeded (status: not halted); with --quorum, every agent not
         cancelled because the quorum was reached
    1    some agents failed
    2    bad usage or input, nothing run: a bad flag, a roster, FR10 refusal (more agents
         than the pool holds in reject mode), more than 100 000 agents, an unwritable
         --json path, an unreachable server, an optional part not installed (the message
         names the extra: llm, valkey, metrics, crewai), a --halt-file whose directory
         does not exist (without --create)
    3    halted (also when the halt was already raised before the start)
    4    the run finished but its --json transcript could not be written: added to the
         run's own code, so 4 = all succeeded, 5 = some failed, 7 = halted
    130  interrupted (Ctrl-C), whatever became of the transcript

Bad input gets one line on stderr, never a traceback.

Here: the parser and the commands (``halt``, ``clear``, ``status``: ``_cli_halt``, for every
channel).  What a run is opened on is in ``_cli_backend``,
what it shows in ``_cli_display``, what it records in ``transcript``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import trio

from adapters.cli import _budget as _cli_budget
from adapters.cli import _latency_history as latency_history
from adapters.cli import _valkey as _cli_valkey
from adapters.cli import load, transcript
from adapters.cli import resume as resume_cli
from adapters.cli._backend import (
    MetricsPush,
    OpeningHaltWatch,
    OperatorInterrupt,
    RateLimitReport,
    UsageError,
    crewai_orchestrator,
    halt_reason_now,
    open_service,
    openai_orchestrator,
    require_extra,
    stub_orchestrator,
)
from adapters.cli._display import (
    LOG_FORMATS,
    Progress,
    announce,
    announce_setup,
    configure_logging,
    plain,
    print_summary,
)
from adapters.cli._halt import check_halt_file, clear_command, halt_command, status_command
from adapters.cli.approve import add_approve_parser, approve_command, signing_options
from adapters.pushgateway import DEFAULT_PUSH_TIMEOUT_S, check_gateway_url
from adapters.roster import MAX_ROSTER_AGENTS, Roster
from adapters.usage import Price, PriceTable
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentOrchestratorProtocol,
    AgentPool,
    AgentPoolExhaustedError,
    AgentRequest,
    ConclaveError,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    HedgePolicy,
    ProgressCallback,
    SystemHaltedError,
)
from kernel import __version__ as kernel_version

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TRANSCRIPT_LOST = 4  # added to the run's own code (see the table above)
#: The most agents one run may have, whatever the mode: the council is built in memory
#: before anything runs (a million agents took 10 s and 555 MB just to be refused).  The
#: roster's own limit, which also caps a --roster file's size before it is parsed.
MAX_AGENTS = MAX_ROSTER_AGENTS
#: The backends that call an OpenAI-compatible endpoint (--base-url, --model).
LLM_BACKENDS = ("openai", "crewai")
#: Each agent's bound without --timeout: every attempt of the LLM backends' defaults
#: (4 of 60 s) and the backoffs between them (at most 3 of 8 s) fit, with room to spare.
#: No agent, whatever its server does, runs for ever.
DEFAULT_AGENT_TIMEOUT_S = 300.0


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviated flags: ``--tim`` silently meaning ``--timeout`` today becomes
        # ambiguous (or something else) the day a flag is added.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


# ---------------------------------------------------------------- argument types


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = _non_negative_float(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _fraction(text: str) -> float:
    value = _non_negative_float(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _gateway_url(text: str) -> str:
    try:
        return check_gateway_url(text)
    except ConclaveError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hedge_after(text: str) -> float | str:
    return "auto" if text == "auto" else _positive_float(text)


_CREATE_HELP = (
    "make the --halt-file's directory if it does not exist (without it, a missing "
    "directory is refused: a mistyped path would be a halt nobody watches)"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="conclave", description="Run a council of agents on one topic.")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("deliberate", help="run one deliberation and print a summary")
    _council_and_run_options(d)
    _cluster_and_tail_options(d)
    _backend_options(d)
    _output_options(d)
    lp = sub.add_parser("load", help="run N batches and judge them against the targets")
    _council_and_run_options(lp)
    _cluster_and_tail_options(lp)
    _backend_options(lp)
    load.add_options(lp)
    v = sub.add_parser("verify", help="verify a witness log's hash chain")
    v.add_argument("db", type=Path, help="the SQLite witness log")
    v.add_argument("--expected-head", help="a chain hash the log must contain (from a receipt)")

    for name, text in (
        ("halt", "raise the halt in a halt file"),
        ("clear", "clear the halt (two approvers)"),
        ("status", "show a halt file's state"),
    ):
        p = sub.add_parser(name, help=text)
        where = p.add_mutually_exclusive_group(required=True)
        where.add_argument("--halt-file", type=Path)
        where.add_argument("--valkey", metavar="URL", help="a halt shared on a Valkey/Redis server")
        _cli_valkey.add_key_prefix_option(p)
        if name == "halt":
            p.add_argument("--create", action="store_true", help=_CREATE_HELP)
        if name in ("halt", "clear"):
            p.add_argument("--reason", required=True)
        if name == "halt":
            signing_options(p, required=False)
        if name in ("halt", "clear"):
            _signers_options(p)
        if name == "clear":
            p.add_argument(
                "--approver",
                action="append",
                default=[],
                help="repeat: at least two distinct approvers (channels without --allowed-signers)",
            )
            p.add_argument(
                "--approval",
                action="append",
                default=[],
                type=Path,
                metavar="FILE",
                help="repeat: signed approvals (conclave approve) from two people",
            )
    add_approve_parser(sub)
    return parser


def _signers_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allowed-signers",
        type=Path,
        metavar="FILE",
        help="OpenSSH allowed-signers file: clears need signed approvals verified by it",
    )
    p.add_argument(
        "--revoked", type=Path, metavar="FILE", help="revoked keys (a KRL or public keys)"
    )


def _council_and_run_options(d: argparse.ArgumentParser) -> None:
    who = d.add_argument_group("council")
    who.add_argument(
        "--agents",
        type=_positive_int,
        default=MAX_CONCURRENT_AGENTS,
        help="number of agents, archon-1..N (default 72; --roster overrides)",
    )
    who.add_argument("--roster", type=Path, help="roster file (.json or .toml)")
    who.add_argument("--topic", default="Should the council adopt the proposal?")
    who.add_argument("--topic-id", default="cli-topic")
    run = d.add_argument_group("run")
    run.add_argument(
        "--backend",
        choices=("stub", "openai", "crewai"),
        default="stub",
        help="crewai: each agent a CrewAI agent (role, goal, backstory from --roster; "
        "needs the crewai extra)",
    )
    run.add_argument(
        "--capacity",
        type=_positive_int,
        default=MAX_CONCURRENT_AGENTS,
        help="pool size (FR10 default: 72)",
    )
    run.add_argument("--overflow", choices=("reject", "queue"), default="reject")
    run.add_argument("--sequential", action="store_true", help="one agent at a time, in order")
    run.add_argument(
        "--timeout",
        type=_positive_float,
        default=None,
        help="per-agent timeout in seconds, which also bounds each LLM request (default: "
        f"{DEFAULT_AGENT_TIMEOUT_S:g} per agent, 60 per request)",
    )
    run.add_argument("--halt-file", type=Path, help="durable halt channel to obey")
    run.add_argument("--create", action="store_true", help=_CREATE_HELP)


def _cluster_and_tail_options(d: argparse.ArgumentParser) -> None:
    cluster = d.add_argument_group("several processes (a Valkey or Redis server they share)")
    cluster.add_argument(
        "--valkey",
        metavar="URL",
        help="obey the halt on this server (redis://, rediss://, valkey://, unix://); "
        "any process can raise it",
    )
    cluster.add_argument(
        "--shared-capacity",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --valkey: at most N agents in flight across every process on the server",
    )
    cluster.add_argument(
        "--replicas",
        type=_positive_int,
        default=None,
        metavar="N",
        help="with --valkey and --rpm/--tpm (one budget for every replica on the server): "
        "while the server is unreachable, each paces at 1/N of the limits",
    )
    _cli_valkey.add_key_prefix_option(cluster)
    _cli_valkey.add_lease_option(cluster)
    tail = d.add_argument_group("tail control (concurrent runs)")
    tail.add_argument(
        "--deadline", type=_positive_float, default=None, help="seconds for the whole batch"
    )
    tail.add_argument(
        "--quorum",
        type=_positive_int,
        default=None,
        metavar="K",
        help="stop once K agents have succeeded; the rest are cancelled",
    )
    tail.add_argument(
        "--hedge-after",
        type=_hedge_after,
        default=None,
        metavar="S|auto",
        help="give an agent still running after S seconds one duplicate call; the first "
        "success wins (auto: the p95 of the answer times earlier auto runs got from this "
        "endpoint and model, kept in $XDG_STATE_HOME/conclave/; no hedging until 20 are "
        "remembered)",
    )
    tail.add_argument(
        "--hedge-budget",
        type=_fraction,
        default=0.1,
        metavar="F",
        help="at most ceil(F x agents) hedged agents per batch (default 0.1)",
    )


def _backend_options(d: argparse.ArgumentParser) -> None:
    stub = d.add_argument_group("stub backend")
    stub.add_argument("--latency-ms", type=_non_negative_float, default=100.0)
    stub.add_argument("--jitter-ms", type=_non_negative_float, default=0.0)
    stub.add_argument(
        "--latency-profile",
        choices=("fixed", "lognormal"),
        default="fixed",
        help="lognormal: heavy-tailed latencies with median --latency-ms and rare stalls",
    )
    stub.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="fraction of agents that fail (0-1)"
    )
    stub.add_argument("--seed", type=int, default=None)
    llm = d.add_argument_group("openai and crewai backends (API key from $OPENAI_API_KEY)")
    llm.add_argument(
        "--base-url",
        help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:11434/v1 (default: "
        "$OPENAI_BASE_URL, else the OpenAI API, https://api.openai.com/v1)",
    )
    llm.add_argument(
        "--model",
        help="model name; the openai backend looks it up in the server's /models listing "
        "first, where there is one",
    )
    llm.add_argument(
        "--transport",
        choices=("httpx", "aiohttp", "auto"),
        default=None,
        help="(openai backend) the HTTP transport under the openai SDK: httpx (default), "
        "aiohttp (less CPU a call; the aiohttp extra), auto (aiohttp where installed)",
    )
    llm.add_argument(
        "--no-model-check",
        action="store_true",
        help="(openai backend) skip that look-up: for a server that lists other names than "
        "it serves",
    )
    llm.add_argument("--max-tokens", type=_positive_int, default=None)
    llm.add_argument(
        "--rpm", type=_positive_int, default=None, help="the provider's requests per minute"
    )
    llm.add_argument(
        "--tpm", type=_positive_int, default=None, help="the provider's tokens per minute"
    )


def _output_options(d: argparse.ArgumentParser) -> None:
    out = d.add_argument_group("output")
    out.add_argument(
        "--json",
        type=Path,
        dest="json_path",
        help="write a transcript: every outcome with ids, hashes, timings ('-': to "
        "stdout, the summary then on stderr)",
    )
    out.add_argument(
        "--include-content",
        action="store_true",
        help="put the agents' answers in the transcript too",
    )
    out.add_argument(
        "--show",
        type=int,
        default=0,
        metavar="N",
        help="print the first N answers after the summary",
    )
    out.add_argument("--quiet", action="store_true", help="no progress display, one-line summary")
    out.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=None,
        help="write the kernel's and adapters' structured logs to stderr",
    )
    out.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=None,
        help="text (default) or json: one JSON object a line, every field a key "
        "(json alone logs at info)",
    )
    out.add_argument(
        "--witness-db",
        type=Path,
        help="commit every output to this SQLite witness log before it is shown",
    )
    resume_cli.add_option(out)
    out.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT while running",
    )
    cost = d.add_argument_group("cost (USD per million tokens; also a roster's prices table)")
    cost.add_argument("--price-prompt", type=_non_negative_float, default=None, metavar="USD")
    cost.add_argument(
        "--price-completion",
        type=_non_negative_float,
        default=None,
        metavar="USD",
        help="with --price-prompt: one price for every model (over --prices and the roster's)",
    )
    cost.add_argument(
        "--prices",
        type=Path,
        default=None,
        metavar="FILE",
        help='per-model prices, .json or .toml: {"prices": {MODEL: {"prompt": P, '
        '"completion": C}}} ("*": every other model); over the roster\'s',
    )
    out.add_argument(
        "--metrics-push",
        type=_gateway_url,
        metavar="URL",
        default=None,
        help="push the run's metrics to this Prometheus Pushgateway at the end "
        "(job conclave, grouped by instance and run id); a gateway that is down is a "
        "warning, never a failed run",
    )
    out.add_argument(
        "--metrics-push-timeout",
        type=_positive_float,
        default=DEFAULT_PUSH_TIMEOUT_S,
        metavar="S",
        help=f"give the push up after S seconds (default {DEFAULT_PUSH_TIMEOUT_S:g})",
    )
    out.add_argument(
        "--otel",
        action="store_true",
        help="export OpenTelemetry traces over OTLP/HTTP (the OTEL_* variables configure "
        "it; OTEL_EXPORTER_OTLP_ENDPOINT set turns it on too)",
    )


# ---------------------------------------------------------------- deliberate


async def deliberate(args: argparse.Namespace) -> int:
    """Check usage, then the halt, then the council's size; open the backend, run the
    batch, report it.  Every refusal comes before the backend is opened."""
    configure_logging(_log_level(args), args.log_format or "text")
    roster_file = await check_usage(args)
    args.price_table = await _price_table(args, roster_file)
    settings = _cli_valkey.ValkeySettings.from_args(args)
    async with (
        _cli_valkey.open_cluster(settings, args.shared_capacity) as cluster,
        _cli_budget.open_budget(args) as budget,
    ):
        return await _deliberate(args, roster_file, cluster, RateLimitReport(budget))


async def _deliberate(
    args: argparse.Namespace,
    roster_file: Roster | None,
    cluster: _cli_valkey.ValkeyCluster,
    limits: RateLimitReport,
) -> int:
    context = ContextBundle(topic_id=args.topic_id, topic_content=args.topic)
    pool = cluster.pool(args.capacity)
    interrupt = OperatorInterrupt()
    checker = cluster.halt_checker(interrupt.switch, args.halt_file)
    # CT-11 first, in the kernel's order: a halted system refuses everything, even an
    # oversize council, and does not probe a server.
    reason = await halt_reason_now(checker)
    if reason is not None:
        return await _finish(args, context, (), None, reason, pool, interrupted=False)
    roster = council(args, roster_file, pool)
    requests = roster.requests(context)
    progress = Progress(len(requests), pool, [r.agent_id for r in requests])
    hedge = await hedge_policy(args)

    result: ConcurrentResult | None = None
    halted: str | None = None
    async with trio.open_nursery() as nursery:
        await nursery.start(interrupt.watch)
        # Opening can take long (a busy server's reachability probe waits up to
        # --timeout), and a halt means "stop now": until the service is open, a halt
        # (Ctrl-C, the halt file, Valkey) cancels the opening, and nothing is left open.
        with trio.CancelScope() as opening:
            watch = OpeningHaltWatch(checker, opening)
            stop_watching = interrupt.switch.on_halt(lambda _reason: opening.cancel())
            nursery.start_soon(watch.run)
            if not args.quiet and args.backend != "stub":  # the stub opens at once
                announce_setup(_setup_line(args))
            async with open_service(
                orchestrator(args, roster_file, roster, limits),
                checker,
                pool,
                agent_timeout=agent_timeout(args),
                witness_db=args.witness_db,
                metrics_port=args.metrics_port,
                metrics_push=_metrics_push(args),
                tracing=args.otel,
            ) as service:
                stop_watching()  # from here on a halt is the kernel's to handle
                watch.stop()
                progress.start()  # the batch's clock: set-up is not batch time
                if not args.quiet:
                    announce(nursery, progress, backend=args.backend)
                try:
                    result = await run_batch(
                        service, args, requests, hedge=hedge, on_progress=progress
                    )
                except SystemHaltedError as exc:
                    # partial is None: halted (or Ctrl-C) after the check above, before
                    # the batch.
                    result, halted = exc.partial, exc.reason
                nursery.cancel_scope.cancel()
        if opening.cancelled_caught:  # halted while opening: halted before the start
            halted = interrupt.switch.reason or watch.reason
            nursery.cancel_scope.cancel()
    await cluster.settle()
    if args.hedge_after == "auto" and args.overflow == "reject":
        # Answer times from the batch's start are agents' latencies only when every
        # agent started with it (not queued).
        key = _latency_key(args)
        await trio.to_thread.run_sync(latency_history.remember, key, progress.answered_after)
    interrupted = interrupt.signal_name is not None
    return await _finish(
        args, context, requests, result, halted, pool, interrupted=interrupted, limits=limits
    )


async def run_batch(
    service: ConcurrentDeliberationService,
    args: argparse.Namespace,
    requests: Sequence[AgentRequest],
    *,
    hedge: HedgePolicy | None,
    on_progress: ProgressCallback | None = None,
) -> ConcurrentResult:
    """One batch as the flags ask (``--sequential``, ``--overflow``, the tail flags;
    ``hedge`` from :func:`hedge_policy`): the one call of ``deliberate`` and of ``load``.
    Raises what the service raises (:class:`~kernel.SystemHaltedError` when halted)."""
    if args.sequential:
        return await service.invoke_sequential(requests, on_progress=on_progress)
    return await service.invoke_concurrent(
        requests,
        overflow=args.overflow,
        on_progress=on_progress,
        deadline=args.deadline,
        quorum=args.quorum,
        hedge=hedge,
        resume=getattr(args, "resume", None),  # deliberate's --resume (load has none)
    )


#: Flags that only mean something to one kind of backend.
_STUB_FLAGS = ("--latency-ms", "--jitter-ms", "--latency-profile", "--fail-rate", "--seed")
_LLM_FLAGS = ("--base-url", "--model", "--max-tokens")


def given_flags(argv: Sequence[str]) -> frozenset[str]:
    """The ``--flags`` written on the command line (``--x=1`` included).  Exact names:
    the parser takes no abbreviations, so a token is the flag it names."""
    return frozenset(token.split("=", 1)[0] for token in argv if token.startswith("--"))


def _check_flags_apply(args: argparse.Namespace) -> None:
    """A flag that would do nothing in this run is an error, never silently ignored:
    the operator meant something by it."""
    given: frozenset[str] = getattr(args, "given_flags", frozenset())
    backend = args.backend
    unused = [f for f in _STUB_FLAGS if f in given] if backend != "stub" else []
    if backend == "stub":
        unused = [f for f in _LLM_FLAGS if f in given]
    if unused:
        raise UsageError(f"{unused[0]} does nothing with --backend {backend}")
    pairs = (
        ("--jitter-ms", args.latency_profile == "lognormal", "with --latency-profile lognormal"),
        ("--hedge-budget", args.hedge_after is None, "without --hedge-after"),
        ("--include-content", args.json_path is None, "without --json"),
        ("--show", args.quiet, "with --quiet (no summary table to show answers under)"),
        ("--create", args.halt_file is None, "without --halt-file"),
    )
    for flag, pointless, why in pairs:
        if flag in given and pointless:
            raise UsageError(f"{flag} does nothing {why}")


async def check_usage(args: argparse.Namespace) -> Roster | None:
    """Refuse what the parser cannot see; return the --roster file's roster, if any."""
    _check_flags_apply(args)
    if not args.topic.strip():  # an unset shell variable: 72 calls asked nothing
        raise UsageError("--topic is empty: the agents would be asked nothing")
    if args.sequential and args.overflow != "reject":
        raise UsageError("--sequential and --overflow queue do not mix")
    if args.shared_capacity is not None and args.valkey is None:
        raise UsageError("--shared-capacity needs --valkey URL (the server that shares it)")
    _cli_budget.check_budget_usage(args)
    _cli_valkey.check_usage(args)
    await check_halt_file(args)
    resume_cli.check_usage(args)
    tail = (
        ("--deadline", args.deadline),
        ("--quorum", args.quorum),
        ("--hedge-after", args.hedge_after),
    )
    for flag, value in tail:
        if args.sequential and value is not None:
            raise UsageError(f"--sequential and {flag} do not mix (tail control is concurrent)")
    _check_llm_flags(args)
    for extra, flag, wanted in (
        ("llm", "--backend openai", args.backend == "openai"),
        ("crewai", "--backend crewai", args.backend == "crewai"),
        ("valkey", "--valkey", args.valkey is not None),
        ("metrics", "--metrics-port", args.metrics_port is not None),
        ("metrics", "--metrics-push", args.metrics_push is not None),
        ("otel", "--otel", args.otel),
    ):
        if wanted:
            require_extra(extra, flag)
    if args.json_path is not None:
        try:
            await trio.to_thread.run_sync(transcript.check_writable, args.json_path)
        except ValueError as exc:
            raise UsageError(f"--json {exc}") from None
    if args.roster is None:
        return None
    return await trio.to_thread.run_sync(Roster.load, args.roster)


def _check_llm_flags(args: argparse.Namespace) -> None:
    # No --base-url: $OPENAI_BASE_URL, else the OpenAI API, as the openai SDK does.
    if args.backend in LLM_BACKENDS and not args.model:
        raise UsageError(f"--backend {args.backend} needs --model")
    if args.backend not in LLM_BACKENDS and (args.rpm or args.tpm):
        raise UsageError("--rpm and --tpm are the LLM backends' (--backend openai or crewai)")
    for flags, used in (
        ("--no-model-check is", args.no_model_check),
        ("--transport is", args.transport),
    ):
        if used and args.backend != "openai":
            raise UsageError(f"{flags} the openai backend's (--backend openai)")


def council(args: argparse.Namespace, roster_file: Roster | None, pool: AgentPool) -> Roster:
    """The --roster file's roster, else ``--agents`` default agents; an impossible council
    is refused before a single request is built.

    Reject mode refuses more agents than the pool holds with the pool's own FR10 message;
    every mode refuses more than :data:`MAX_AGENTS`, and a ``--quorum`` above the size.
    """
    size = len(roster_file) if roster_file is not None else args.agents
    if args.overflow == "reject" and not args.sequential and size > pool.available_count:
        raise AgentPoolExhaustedError(
            f"FR10: agent pool exhausted: {pool.max_concurrent - pool.available_count} active "
            f"+ {size} requested > {pool.max_concurrent}"
        )
    shared = pool.shared
    if args.overflow == "reject" and not args.sequential and shared and size > shared.capacity:
        raise AgentPoolExhaustedError(
            f"FR10: shared capacity exhausted: {size} requested > {shared.capacity}"
        )
    if size > MAX_AGENTS:
        what = f"--roster {args.roster} has {size} agents" if args.roster else f"--agents {size}"
        raise UsageError(f"{what}: at most {MAX_AGENTS} agents in one run")
    if args.quorum is not None and args.quorum > size:
        # The kernel refuses it too, but only once the backend is open and the run begun.
        raise UsageError(
            f"--quorum {args.quorum}: quorum must be between 1 and the batch size "
            f"({size}), got {args.quorum}"
        )
    return roster_file if roster_file is not None else Roster.default(size)


async def _price_table(args: argparse.Namespace, roster_file: Roster | None) -> PriceTable | None:
    """The run's prices: the flags' (every model), else --prices FILE, else the roster's."""
    flags = (args.price_prompt, args.price_completion)
    if (flags[0] is None) != (flags[1] is None):
        raise UsageError("--price-prompt and --price-completion go together")
    if flags[0] is not None:
        try:
            return PriceTable(default=Price(*flags))
        except ConclaveError as exc:
            raise UsageError(f"--price-prompt/--price-completion: {exc}") from None
    if args.prices is not None:
        try:
            return await trio.to_thread.run_sync(PriceTable.load, args.prices)
        except ConclaveError as exc:
            raise UsageError(f"--prices {exc}") from None
    return roster_file.prices if roster_file is not None else None


def _log_level(args: argparse.Namespace) -> str | None:
    """``--log-level``; ``info`` when only ``--log-format`` asks for logs."""
    if args.log_level is None and args.log_format is not None:
        return "info"
    return args.log_level  # type: ignore[no-any-return]


def _setup_line(args: argparse.Namespace) -> str:
    """What the run waits on before its batch can start."""
    from adapters.urls import redact_url

    where = redact_url(args.base_url) if args.base_url else "the endpoint"
    if args.backend == "crewai":
        return f"starting the crewai backend (importing CrewAI, then probing {where})"
    return f"probing {where}"


def agent_timeout(args: argparse.Namespace) -> float:
    """Each agent's bound: ``--timeout``, else :data:`DEFAULT_AGENT_TIMEOUT_S`."""
    return float(args.timeout) if args.timeout is not None else DEFAULT_AGENT_TIMEOUT_S


def _metrics_push(args: argparse.Namespace) -> MetricsPush | None:
    if args.metrics_push is None:
        return None
    return MetricsPush(args.metrics_push, timeout_s=args.metrics_push_timeout)


def _latency_key(args: argparse.Namespace) -> str:
    stub = f"{args.latency_ms}:{args.jitter_ms}:{args.latency_profile}"
    if args.backend in LLM_BACKENDS:
        return latency_history.history_key(args.backend, args.base_url, args.model)
    return latency_history.history_key(args.backend, None, None, stub)


async def hedge_policy(args: argparse.Namespace) -> HedgePolicy | None:
    """``--hedge-after S``, or ``auto``: the p95 of the answers earlier runs got from this
    endpoint and model (a one-batch run has no answers of its own to hedge on yet)."""
    if args.hedge_after is None:
        return None
    if args.hedge_after != "auto":
        return HedgePolicy(delay=args.hedge_after, budget=args.hedge_budget)
    if args.overflow != "reject":
        raise UsageError(
            "--hedge-after auto learns answer times from runs whose agents all start at "
            "once; with --overflow queue give seconds (--hedge-after S)"
        )
    samples = await trio.to_thread.run_sync(latency_history.load, _latency_key(args))
    delay = latency_history.delay(samples)
    if delay is None:
        print(
            f"conclave: --hedge-after auto: {len(samples)} of the "
            f"{latency_history.MIN_SAMPLES} earlier answers it needs are remembered for "
            "this endpoint and model; not hedging this run (its answers are remembered "
            "for the next)",
            file=sys.stderr,
        )
        return None
    print(
        f"conclave: --hedge-after auto: hedging after {delay:.2f} s, the p95 of "
        f"{len(samples)} earlier answers from this endpoint and model",
        file=sys.stderr,
    )
    return HedgePolicy(delay=delay, budget=args.hedge_budget)


def orchestrator(
    args: argparse.Namespace,
    roster_file: Roster | None,
    roster: Roster,
    limits: RateLimitReport | None = None,
) -> AbstractAsyncContextManager[AgentOrchestratorProtocol]:
    """The --backend's orchestrator, with its flags (opened by ``open_service``)."""
    if args.backend == "stub":
        return stub_orchestrator(
            roster.agent_ids,
            latency_ms=args.latency_ms,
            jitter_ms=args.jitter_ms,
            fail_rate=args.fail_rate,
            seed=args.seed,
            latency_profile=args.latency_profile,
        )
    from adapters.llm.provider_budget import ProviderLimits

    # --rpm/--tpm with --valkey: the budget every replica on that server shares.
    shared = limits.shared if limits is not None else None
    provider = ProviderLimits(args.rpm, args.tpm, shared=shared) if args.rpm or args.tpm else None
    if args.backend == "crewai":  # every agent needs a persona: the council's roster
        return crewai_orchestrator(
            args.base_url,
            args.model,
            roster=roster,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            limits=provider,
            report=limits,
        )
    return openai_orchestrator(
        args.base_url,
        args.model,
        roster=roster_file,
        max_tokens=args.max_tokens,
        timeout_s=args.timeout,
        limits=provider,
        report=limits,
        check_models=not args.no_model_check,
        transport=args.transport or "httpx",
    )


async def _finish(
    args: argparse.Namespace,
    context: ContextBundle,
    requests: Sequence[AgentRequest],
    result: ConcurrentResult | None,
    halted: str | None,
    pool: AgentPool,
    *,
    interrupted: bool,
    limits: RateLimitReport | None = None,
) -> int:
    """Record and report a run; return its exit code.  ``result`` is None when the run
    was halted before its batch began.

    A transcript that cannot be written does not throw the run away: the summary is
    still shown, the failure is one line on stderr and adds
    :data:`EXIT_TRANSCRIPT_LOST` to the exit code (an interrupt stays 130).
    """
    if result is None:
        print(f"conclave: halted before starting: {plain(halted or '')}", file=sys.stderr)
    lost = None
    if args.json_path is not None:
        doc = transcript.document(
            context=context,
            requests=requests,
            result=result,
            halt_reason=halted,
            interrupted=interrupted,
            backend=args.backend,
            model=args.model if args.backend in LLM_BACKENDS else None,
            pool_after=pool.status(),
            include_content=args.include_content,
            prices=args.price_table,
        )
        try:
            await trio.to_thread.run_sync(transcript.write, args.json_path, doc)
        except OSError as exc:
            lost = f"--json {args.json_path}: {exc.strerror or exc}"
    resume_cli.print_resume_hint(args, result)
    if result is not None:
        print_summary(
            result,
            halt_reason=halted,
            pool_after=pool.status(),
            ideal_ms=_ideal_ms(args, len(requests)),
            quiet=args.quiet,
            show=args.show,
            rate_limits=limits.stats() if limits is not None else None,
            to_stderr=args.json_path == transcript.STDOUT,
            quorum=getattr(args, "quorum", None),
            prices=args.price_table,
        )
        shared = _cli_budget.summary_line(limits.shared if limits is not None else None)
        if shared is not None:
            print(f"conclave: {shared}")
    if args.witness_db is not None:
        await _print_witness_head(args.witness_db, to_stderr=args.json_path == transcript.STDOUT)
    if interrupted:
        code = EXIT_INTERRUPTED
    elif halted is not None:
        code = EXIT_HALTED
    else:
        # Agents cancelled because the quorum was reached did what was asked of the run.
        failed = result is None or any(f.kind is not FailureKind.CANCELLED for f in result.failures)
        code = EXIT_FAILURES if failed else EXIT_OK
    if lost is None:
        return code
    print(f"conclave: transcript not written: {lost}", file=sys.stderr)
    return code if code == EXIT_INTERRUPTED else code + EXIT_TRANSCRIPT_LOST


async def _print_witness_head(db: Path, *, to_stderr: bool) -> None:
    """The log's head after the run: what ``verify --expected-head`` takes later to
    prove the log still ends (or passes) where this run left it."""
    from adapters.witness.sqlite import WitnessError, log_head

    def read() -> tuple[int, str] | str | None:
        if not db.exists():  # halted before the run began: the log was never opened
            return "not created"
        try:
            return log_head(db)
        except WitnessError as exc:
            return str(exc)

    head = await trio.to_thread.run_sync(read)
    if isinstance(head, str):
        line = f"witness log: {head}"
    elif head is None:
        line = "witness log: empty"
    else:
        line = f"witness log: {head[0]} records, head {head[1]}"
    print(line, file=sys.stderr if to_stderr else sys.stdout)


def _ideal_ms(args: argparse.Namespace, n: int) -> float | None:
    if args.backend != "stub" or args.jitter_ms or not args.latency_ms:
        return None
    latency_ms = float(args.latency_ms)
    if args.sequential:
        return n * latency_ms
    waves = math.ceil(n / args.capacity) if args.overflow == "queue" else 1
    return waves * latency_ms


async def verify_command(args: argparse.Namespace) -> int:
    from adapters.witness.sqlite import verify_log

    # Read-only: refuses (exit 2) anything that is not a witness log, never creates one.
    report = await trio.to_thread.run_sync(verify_log, args.db, args.expected_head)
    if report.ok:
        head = f", head {report.head}" if report.head else ""
        print(f"ok: {report.records} records, chain intact{head}")
        return EXIT_OK
    where = f"sequence {report.first_bad_sequence}" if report.first_bad_sequence else "the log"
    print(f"BROKEN at {where}: {report.problem} ({report.records} records verified before it)")
    return EXIT_FAILURES


COMMANDS = {
    "deliberate": deliberate,
    "load": load.load_command,
    "verify": verify_command,
    "halt": halt_command,
    "clear": clear_command,
    "status": status_command,
    "approve": approve_command,
}


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside nested single-error groups (trio nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def version_line() -> str:
    """What ``conclave --version`` prints: this release, and what it runs on."""
    import platform

    return (
        f"conclave {kernel_version} (trio {trio.__version__}, Python {platform.python_version()})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as done:  # --help, --version: printed, nothing to run
            return done.code if isinstance(done.code, int) else EXIT_OK
        args.given_flags = given_flags(sys.argv[1:] if argv is None else argv)
        try:
            return trio.run(COMMANDS[args.command], args)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    # Bad usage or input, a refused admission, a denied clear, a file that cannot be
    # written (the halt file): one line, exit 2.  plain(): a message may quote a server,
    # a file or a halt reason, whose control characters must not reach the terminal.
    except (UsageError, ConclaveError, OSError) as exc:
        print(f"conclave: {plain(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("conclave: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
