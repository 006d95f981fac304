"""``conclave``: run a deliberation an operator can watch and stop; manage the halt file.

    conclave deliberate [--backend stub|openai] [--agents N | --roster FILE] [--topic TEXT] ...
    conclave halt   --halt-file PATH --reason TEXT
    conclave clear  --halt-file PATH --approver A --approver B --reason TEXT
    conclave status --halt-file PATH
    conclave verify DB

Exit codes:

    0    every agent succeeded (status: not halted)
    1    some agents failed
    2    bad usage or input, nothing run: a bad flag, a roster, FR10 refusal (more agents
         than the pool holds in reject mode), more than 100 000 agents, an unwritable
         --json path, an unreachable server
    3    halted (also when the halt was already raised before the start)
    4    the run finished but its --json transcript could not be written: added to the
         run's own code, so 4 = all succeeded, 5 = some failed, 7 = halted
    130  interrupted (Ctrl-C), whatever became of the transcript

Bad input gets one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import math
import random
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import trio

from adapters import transcript
from adapters._cli_display import Progress, configure_logging, live_display, print_summary
from adapters.roster import Roster
from adapters.stub import AgentOrchestratorStub
from kernel import (
    DEFAULT_HALT_READ_TIMEOUT,
    MAX_CONCURRENT_AGENTS,
    AgentInvocationError,
    AgentOrchestratorProtocol,
    AgentPool,
    AgentPoolExhaustedError,
    AgentRequest,
    ConclaveError,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    DualChannelHaltChecker,
    HaltChecker,
    HaltSwitch,
    SystemHaltedError,
    read_halt,
)

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_TRANSCRIPT_LOST = 4  # added to the run's own code (see the table above)
#: The most agents one run may have, whatever the mode: the council is built in memory
#: before anything runs (a million agents took 10 s and 555 MB just to be refused).
MAX_AGENTS = 100_000


class UsageError(Exception):
    """Bad usage or input: one line on stderr, exit 2."""


class _Parser(argparse.ArgumentParser):
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="conclave", description="Run a council of agents on one topic.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    d = sub.add_parser("deliberate", help="run one deliberation and print a summary")
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
    run.add_argument("--backend", choices=("stub", "openai"), default="stub")
    run.add_argument(
        "--capacity",
        type=_positive_int,
        default=MAX_CONCURRENT_AGENTS,
        help="pool size (FR10 default: 72)",
    )
    run.add_argument("--overflow", choices=("reject", "queue"), default="reject")
    run.add_argument("--sequential", action="store_true", help="one agent at a time, in order")
    run.add_argument(
        "--timeout", type=_positive_float, default=None, help="per-agent timeout in seconds"
    )
    run.add_argument("--halt-file", type=Path, help="durable halt channel to obey")
    stub = d.add_argument_group("stub backend")
    stub.add_argument("--latency-ms", type=_non_negative_float, default=100.0)
    stub.add_argument("--jitter-ms", type=_non_negative_float, default=0.0)
    stub.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="fraction of agents that fail (0-1)"
    )
    stub.add_argument("--seed", type=int, default=None)
    llm = d.add_argument_group("openai backend (API key from $OPENAI_API_KEY)")
    llm.add_argument(
        "--base-url", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:11434/v1"
    )
    llm.add_argument("--model", help="model name")
    llm.add_argument("--max-tokens", type=_positive_int, default=None)
    out = d.add_argument_group("output")
    out.add_argument(
        "--json",
        type=Path,
        dest="json_path",
        help="write a transcript: every outcome with ids, hashes, timings",
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
        "--witness-db",
        type=Path,
        help="commit every output to this SQLite witness log before it is shown",
    )
    out.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics on 127.0.0.1:PORT while running",
    )

    v = sub.add_parser("verify", help="verify a witness log's hash chain")
    v.add_argument("db", type=Path, help="the SQLite witness log")
    v.add_argument("--expected-head", help="a chain hash the log must contain (from a receipt)")

    for name, text in (
        ("halt", "raise the halt in a halt file"),
        ("clear", "clear the halt (two approvers)"),
        ("status", "show a halt file's state"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--halt-file", type=Path, required=True)
        if name in ("halt", "clear"):
            p.add_argument("--reason", required=True)
        if name == "clear":
            p.add_argument(
                "--approver",
                action="append",
                default=[],
                required=True,
                help="repeat: at least two distinct approvers",
            )
    return parser


# ---------------------------------------------------------------- deliberate


async def deliberate(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.sequential and args.overflow != "reject":
        raise UsageError("--sequential and --overflow queue do not mix")
    if args.backend == "openai" and not (args.base_url and args.model):
        raise UsageError("--backend openai needs --base-url and --model")
    if args.json_path is not None:
        try:
            await trio.to_thread.run_sync(transcript.check_writable, args.json_path)
        except ValueError as exc:
            raise UsageError(f"--json {exc}") from None
    roster_file = None
    if args.roster is not None:
        roster_file = await trio.to_thread.run_sync(Roster.load, args.roster)
    context = ContextBundle(topic_id=args.topic_id, topic_content=args.topic)
    pool = AgentPool(args.capacity)
    interrupt = _OperatorInterrupt(HaltSwitch())
    checker: HaltChecker = interrupt.switch
    if args.halt_file is not None:
        from adapters.file_halt import FileHaltChannel

        checker = DualChannelHaltChecker(checker, FileHaltChannel(args.halt_file, 0.02))
    # CT-11 first, in the kernel's order: a halted system refuses everything, even an
    # oversize council, and does not probe a server.
    reason = await _read_halt(checker)
    if reason is not None:
        return await _finish(args, context, (), None, reason, pool, interrupted=False)
    size = len(roster_file) if roster_file is not None else args.agents
    _check_council_size(args, size, pool)
    roster = roster_file if roster_file is not None else Roster.default(size)
    requests = roster.requests(context)
    progress = Progress(len(requests), pool)

    result: ConcurrentResult | None = None
    halted: str | None = None
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(interrupt.watch)
        service = await _open_service(args, stack, roster_file, roster, checker, pool)
        if not args.quiet and sys.stderr.isatty():
            nursery.start_soon(live_display, progress)
        if not args.quiet:
            # A plain line (also when stderr is not a terminal) that says the batch is on.
            print(
                f"conclave: deliberating with {len(requests)} agents ({args.backend} backend)",
                file=sys.stderr,
                flush=True,
            )
        try:
            if args.sequential:
                result = await service.invoke_sequential(requests, on_progress=progress)
            else:
                result = await service.invoke_concurrent(
                    requests, overflow=args.overflow, on_progress=progress
                )
        except SystemHaltedError as exc:
            # partial is None: halted (or Ctrl-C) after the check above, before the batch.
            result, halted = exc.partial, exc.reason
        nursery.cancel_scope.cancel()
    interrupted = interrupt.signal_name is not None
    return await _finish(args, context, requests, result, halted, pool, interrupted=interrupted)


class _OperatorInterrupt:
    """Ctrl-C (or SIGTERM) raises the halt: a clean stop with a partial summary.

    A second one stops waiting for the clean halt (``KeyboardInterrupt``, exit 130).
    """

    def __init__(self, switch: HaltSwitch) -> None:
        self.switch = switch
        self.signal_name: str | None = None  # the first signal's, once one came

    async def watch(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()  # from here on, Ctrl-C means "halt", not KeyboardInterrupt
            async for signum in signals:
                if self.signal_name is not None:
                    raise KeyboardInterrupt  # second Ctrl-C: stop waiting for a clean halt
                self.signal_name = signal.Signals(signum).name
                self.switch.halt(f"operator interrupt ({self.signal_name})")


async def _read_halt(checker: HaltChecker) -> str | None:
    """The halt reason if the system is halted now, else None (CT-11 before the start).

    Fail-safe like the kernel: a read that raises, or does not answer within
    :data:`kernel.DEFAULT_HALT_READ_TIMEOUT`, counts as halted.
    """
    try:
        return await read_halt(checker, DEFAULT_HALT_READ_TIMEOUT)
    except Exception as exc:
        return f"halt channel unreadable ({type(exc).__name__}); treated as halted"


def _check_council_size(args: argparse.Namespace, size: int, pool: AgentPool) -> None:
    """Refuse an impossible council before a single request is built.

    Reject mode refuses more agents than the pool holds with the pool's own FR10 message;
    every mode refuses more than :data:`MAX_AGENTS`.
    """
    if args.overflow == "reject" and not args.sequential and size > pool.available_count:
        raise AgentPoolExhaustedError(
            f"FR10: agent pool exhausted: {pool.max_concurrent - pool.available_count} active "
            f"+ {size} requested > {pool.max_concurrent}"
        )
    if size > MAX_AGENTS:
        what = f"--roster {args.roster} has {size} agents" if args.roster else f"--agents {size}"
        raise UsageError(f"{what}: at most {MAX_AGENTS} agents in one run")


async def _open_service(
    args: argparse.Namespace,
    stack: AsyncExitStack,
    roster_file: Roster | None,
    roster: Roster,
    checker: HaltChecker,
    pool: AgentPool,
) -> ConcurrentDeliberationService:
    """The backend, the witness and the metrics server, each closed by ``stack``."""
    orchestrator = await stack.enter_async_context(
        _orchestrator(args, roster_file, roster.agent_ids)
    )
    witness = None
    if args.witness_db is not None:
        from adapters.sqlite_witness import SqliteWitness

        witness = await stack.enter_async_context(SqliteWitness(args.witness_db))
    service = ConcurrentDeliberationService(
        orchestrator, checker, pool, agent_timeout=args.timeout, witness=witness
    )
    if args.metrics_port is not None:
        _serve_metrics(service, args.metrics_port, stack)
    return service


@asynccontextmanager
async def _orchestrator(
    args: argparse.Namespace, roster: Roster | None, agent_ids: Sequence[str]
) -> AsyncIterator[AgentOrchestratorProtocol]:
    if args.backend == "stub":
        rng = random.Random(args.seed)
        failing = rng.sample(list(agent_ids), round(args.fail_rate * len(agent_ids)))
        yield AgentOrchestratorStub(
            latency_ms=args.latency_ms,
            fail_agents=failing,
            jitter_ms=args.jitter_ms,
            seed=args.seed,
        )
        return
    # Imported here: the stub path needs neither openai nor trio-asyncio.
    from adapters.asyncio_bridge import AsyncioOrchestratorBridge
    from adapters.openai_chat import OpenAIChatOrchestrator

    inner = OpenAIChatOrchestrator(
        args.base_url,
        args.model,
        roster=roster,
        max_tokens=args.max_tokens,
        **({"timeout_s": args.timeout} if args.timeout else {}),
    )
    async with AsyncioOrchestratorBridge(inner) as bridge:
        try:
            # Waits as long as an agent's request would (--timeout); only a connection
            # failure is "cannot reach", silence is a busy server (llama.cpp).
            answered = await bridge.run_asyncio(inner.check_reachable)
        except AgentInvocationError as exc:
            raise UsageError(str(exc)) from None
        if not answered:
            print(
                f"conclave: warning: {inner.base_url} did not answer within "
                f"{inner.timeout_s:g} s; assuming it is busy and going on",
                file=sys.stderr,
                flush=True,
            )
        yield bridge


def _serve_metrics(
    service: ConcurrentDeliberationService, port: int, stack: AsyncExitStack
) -> None:
    try:
        from prometheus_client import CollectorRegistry

        from adapters.prometheus import export_service_metrics, serve_metrics
    except ImportError:
        raise UsageError(
            "--metrics-port needs prometheus-client: pip install 'conclave-kernel[metrics]'"
        ) from None
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


async def _finish(
    args: argparse.Namespace,
    context: ContextBundle,
    requests: Sequence[AgentRequest],
    result: ConcurrentResult | None,
    halted: str | None,
    pool: AgentPool,
    *,
    interrupted: bool,
) -> int:
    """Record and report a run; return its exit code.  ``result`` is None when the run
    was halted before its batch began.

    A transcript that cannot be written does not throw the run away: the summary is
    still shown, the failure is one line on stderr and adds
    :data:`EXIT_TRANSCRIPT_LOST` to the exit code (an interrupt stays 130).
    """
    if result is None:
        print(f"conclave: halted before starting: {halted}", file=sys.stderr)
    lost = None
    if args.json_path is not None:
        doc = transcript.document(
            context=context,
            requests=requests,
            result=result,
            halt_reason=halted,
            interrupted=interrupted,
            backend=args.backend,
            model=args.model if args.backend == "openai" else None,
            pool_after=pool.status(),
            include_content=args.include_content,
        )
        try:
            await trio.to_thread.run_sync(transcript.write, args.json_path, doc)
        except OSError as exc:
            lost = f"--json {args.json_path}: {exc.strerror or exc}"
    if result is not None:
        print_summary(
            result,
            halt_reason=halted,
            pool_after=pool.status(),
            ideal_ms=_ideal_ms(args, len(requests)),
            quiet=args.quiet,
            show=args.show,
        )
    if interrupted:
        code = EXIT_INTERRUPTED
    elif halted is not None:
        code = EXIT_HALTED
    else:
        code = EXIT_OK if result is not None and result.failure_count == 0 else EXIT_FAILURES
    if lost is None:
        return code
    print(f"conclave: transcript not written: {lost}", file=sys.stderr)
    return code if code == EXIT_INTERRUPTED else code + EXIT_TRANSCRIPT_LOST


def _ideal_ms(args: argparse.Namespace, n: int) -> float | None:
    if args.backend != "stub" or args.jitter_ms or not args.latency_ms:
        return None
    latency_ms = float(args.latency_ms)
    if args.sequential:
        return n * latency_ms
    waves = math.ceil(n / args.capacity) if args.overflow == "queue" else 1
    return waves * latency_ms


# ---------------------------------------------------------------- halt / clear / status


async def halt_command(args: argparse.Namespace) -> int:
    from adapters.file_halt import FileHaltChannel

    channel = FileHaltChannel(args.halt_file)
    if await channel.ahalt(args.reason):
        print(f"halted: {args.reason}")
    else:
        print(f"already halted: {await channel.get_halt_reason()}")
    return EXIT_OK


async def clear_command(args: argparse.Namespace) -> int:
    from adapters.file_halt import FileHaltChannel

    channel = FileHaltChannel(args.halt_file)
    was_halted = await channel.is_halted()
    await channel.aclear(approvers=args.approver, reason=args.reason)
    print("cleared" if was_halted else "not halted; nothing to clear")
    return EXIT_OK


async def status_command(args: argparse.Namespace) -> int:
    from adapters.file_halt import FileHaltChannel

    state = await FileHaltChannel(args.halt_file).state()
    if state.halted:
        print(f"HALTED: {state.reason}")
    else:
        print("not halted")
    for record in state.history[-5:]:
        who = f" by {', '.join(record.approvers)}" if record.approvers else ""
        print(f"  {record.at.isoformat()} {record.action}{who}: {record.reason}")
    return EXIT_HALTED if state.halted else EXIT_OK


async def verify_command(args: argparse.Namespace) -> int:
    from adapters.sqlite_witness import SqliteWitness

    if not args.db.is_file():
        raise UsageError(f"{args.db}: no such witness log")
    async with SqliteWitness(args.db) as witness:
        report = await witness.verify(expected_head=args.expected_head)
    if report.ok:
        print(f"ok: {report.records} records, chain intact")
        return EXIT_OK
    where = f"sequence {report.first_bad_sequence}" if report.first_bad_sequence else "the log"
    print(f"BROKEN at {where}: {report.problem} ({report.records} records verified before it)")
    return EXIT_FAILURES


COMMANDS = {
    "deliberate": deliberate,
    "verify": verify_command,
    "halt": halt_command,
    "clear": clear_command,
    "status": status_command,
}


def _leaf(exc: BaseException) -> BaseException:
    """The one error inside nested single-error groups (trio nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        try:
            return trio.run(COMMANDS[args.command], args)
        except BaseExceptionGroup as group:
            raise _leaf(group) from None
    # Bad usage or input, a refused admission, a denied clear, a file that cannot be
    # written (the halt file): one line, exit 2.
    except (UsageError, ConclaveError, OSError) as exc:
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("conclave: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
