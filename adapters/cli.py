"""``conclave``: run a deliberation an operator can watch and stop; manage the halt file.

    conclave deliberate [--backend stub|openai] [--agents N | --roster FILE] [--topic TEXT] ...
    conclave halt   --halt-file PATH --reason TEXT
    conclave clear  --halt-file PATH --approver A --approver B --reason TEXT
    conclave status --halt-file PATH
    conclave verify DB

Exit codes: 0 every agent succeeded (or: not halted), 1 some agents failed, 2 bad usage
or input, 3 halted, 130 interrupted (Ctrl-C).  Bad input gets one line on stderr,
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import signal
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from adapters._atomic import write_atomically
from adapters.roster import Roster
from adapters.stub import AgentOrchestratorStub
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentFailure,
    AgentInvocationError,
    AgentOrchestratorProtocol,
    AgentOutput,
    AgentPool,
    AgentRequest,
    ConclaveError,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    DualChannelHaltChecker,
    HaltChecker,
    HaltSwitch,
    SystemHaltedError,
)

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_HALTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
TRANSCRIPT_SCHEMA = "conclave.transcript/1"


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


class Progress:
    """Counters the progress display reads (updated by on_progress)."""

    def __init__(self, total: int, pool: AgentPool) -> None:
        self.total = total
        self.pool = pool
        self.done = 0
        self.failed = 0
        self.started = trio.current_time()

    def __call__(self, done: int, total: int, agent_id: str, status: str) -> None:
        self.done = done  # the service counts finished agents; only failures are ours
        if status == "failed":
            self.failed += 1

    @property
    def elapsed(self) -> float:
        return trio.current_time() - self.started


async def _live_display(progress: Progress) -> None:
    """Redraw a one-line status on stderr ~10 times a second until cancelled (TTY only)."""
    from rich.console import Console
    from rich.live import Live
    from rich.text import Text

    console = Console(stderr=True)

    def render() -> Text:
        bar_width = 30
        filled = int(bar_width * progress.done / max(progress.total, 1))
        return Text.assemble(
            ("deliberating ", "bold"),
            ("█" * filled + "░" * (bar_width - filled), "cyan"),
            f" {progress.done}/{progress.total} done · ",
            (f"{progress.failed} failed", "red" if progress.failed else ""),
            f" · {progress.pool.active_count} in flight · {progress.elapsed:.1f} s",
        )

    with Live(render(), console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                live.update(render(), refresh=True)
                await trio.sleep(0.1)
        finally:
            live.update(render(), refresh=True)


async def _watch_signals(
    switch: HaltSwitch,
    state: dict[str, Any],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ctrl-C (or SIGTERM) raises the halt: a clean stop with a partial summary."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()  # from here on, Ctrl-C means "halt", not KeyboardInterrupt
        async for signum in signals:
            if state.get("interrupted"):
                raise KeyboardInterrupt  # second Ctrl-C: stop waiting for a clean halt
            state["interrupted"] = signal.Signals(signum).name
            switch.halt(f"operator interrupt ({signal.Signals(signum).name})")


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

    if not args.base_url or not args.model:
        raise UsageError("--backend openai needs --base-url and --model")
    inner = OpenAIChatOrchestrator(
        args.base_url,
        args.model,
        roster=roster,
        max_tokens=args.max_tokens,
        **({"timeout_s": args.timeout} if args.timeout else {}),
    )
    async with AsyncioOrchestratorBridge(inner) as bridge:
        try:
            await bridge.run_asyncio(inner.check_reachable)
        except AgentInvocationError as exc:
            raise UsageError(str(exc)) from None
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


def _check_output_path(path: Path | None) -> None:
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"--json {path}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--json {path}: directory {path.parent} does not exist")


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...``: the ``extra=`` fields made visible."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in self._STANDARD}
        if extras:
            line += " " + " ".join(
                f"{k}={v!r}" if isinstance(v, str) and " " in v else f"{k}={v}"
                for k, v in sorted(extras.items())
            )
        return line


def _configure_logging(level: str | None) -> None:
    if level is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("kernel", "adapters"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level.upper())


async def deliberate(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    _check_output_path(args.json_path)
    if args.sequential and args.overflow != "reject":
        raise UsageError("--sequential and --overflow queue do not mix")
    roster = Roster.load(args.roster) if args.roster else Roster.default(args.agents)
    context = ContextBundle(topic_id=args.topic_id, topic_content=args.topic)
    requests = roster.requests(context)
    pool = AgentPool(args.capacity)
    switch = HaltSwitch()
    checker: HaltChecker = switch
    if args.halt_file is not None:
        from adapters.file_halt import FileHaltChannel

        checker = DualChannelHaltChecker(switch, FileHaltChannel(args.halt_file, 0.02))
    state: dict[str, Any] = {}
    progress = Progress(len(requests), pool)
    show_live = not args.quiet and sys.stderr.isatty()

    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        await nursery.start(_watch_signals, switch, state)
        orchestrator = await stack.enter_async_context(
            _orchestrator(args, roster if args.roster else None, roster.agent_ids)
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
        if show_live:
            nursery.start_soon(_live_display, progress)
        halted: str | None = None
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
            if exc.partial is None:
                print(f"conclave: halted before starting: {exc.reason}", file=sys.stderr)
                nursery.cancel_scope.cancel()
                return EXIT_INTERRUPTED if state.get("interrupted") else EXIT_HALTED
            result, halted = exc.partial, exc.reason
        nursery.cancel_scope.cancel()

    if args.json_path is not None:
        _write_transcript(args, requests, result, halted, state, pool)
    _print_summary(args, result, halted, pool, requests)
    if state.get("interrupted"):
        return EXIT_INTERRUPTED
    if halted is not None:
        return EXIT_HALTED
    return EXIT_OK if result.failure_count == 0 else EXIT_FAILURES


def _ideal_ms(args: argparse.Namespace, n: int) -> float | None:
    if args.backend != "stub" or args.jitter_ms or not args.latency_ms:
        return None
    latency_ms = float(args.latency_ms)
    if args.sequential:
        return n * latency_ms
    waves = math.ceil(n / args.capacity) if args.overflow == "queue" else 1
    return waves * latency_ms


def _print_summary(
    args: argparse.Namespace,
    result: ConcurrentResult,
    halted: str | None,
    pool: AgentPool,
    requests: Sequence[AgentRequest],
) -> None:
    kinds = Counter(f.kind.value for f in result.failures)
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    ideal = _ideal_ms(args, len(requests))
    timing = f"{result.total_ms:.1f} ms"
    if ideal:
        timing += f" (ideal {ideal:.1f} ms, x{result.total_ms / ideal:.2f})"
    pool_line = f"{pool.active_count} active, {pool.available_count}/{pool.max_concurrent} free"
    if halted is not None:
        status = "HALTED"
    else:
        status = "completed with failures" if result.failures else "completed"
    if args.quiet:
        print(
            f"conclave: {status}: {result.success_count}/{result.total_count} succeeded, "
            f"{result.failure_count} failed{f' ({by_kind})' if by_kind else ''}, {timing}, "
            f"pool {pool_line}"
        )
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"conclave deliberation · batch {result.batch_id}",
        title_justify="left",
        show_header=False,
        box=None,
        pad_edge=False,
    )
    table.add_column(style="bold")
    table.add_column()
    table.add_row("status", status + (f": {halted}" if halted else ""))
    table.add_row("agents", str(result.total_count))
    table.add_row("succeeded", str(result.success_count))
    table.add_row("failed", str(result.failure_count) + (f" ({by_kind})" if by_kind else ""))
    table.add_row("batch time", timing)
    table.add_row("pool after", pool_line)
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    for failure in result.failures[:5]:
        console.print(
            f"  ! {failure.agent_id}: {failure.kind.value}: {failure.message}", markup=False
        )
    if len(result.failures) > 5:
        console.print(f"  ! ... and {len(result.failures) - 5} more")
    for output in result.outputs[: max(args.show, 0)]:
        console.print(f"\n[bold]{output.agent_id}[/bold]:")
        console.print(output.content, markup=False)


def _outcome_record(outcome: AgentOutput | AgentFailure, include_content: bool) -> dict[str, Any]:
    if isinstance(outcome, AgentOutput):
        record: dict[str, Any] = {
            "agent_id": outcome.agent_id,
            "request_id": str(outcome.request_id),
            "status": "completed",
            "output_id": str(outcome.output_id),
            "content_hash": outcome.content_hash,
            "content_type": outcome.content_type,
            "generated_at": outcome.generated_at.isoformat(),
            "metadata": dict(outcome.metadata),
        }
        if include_content:
            record["content"] = outcome.content
        return record
    return {
        "agent_id": outcome.agent_id,
        "request_id": str(outcome.request_id),
        "status": "failed",
        "kind": outcome.kind.value,
        "error_type": outcome.error_type,
        "message": outcome.message,
        "elapsed_ms": outcome.elapsed_ms,
    }


def _write_transcript(
    args: argparse.Namespace,
    requests: Sequence[AgentRequest],
    result: ConcurrentResult,
    halted: str | None,
    state: dict[str, Any],
    pool: AgentPool,
) -> None:
    outcomes: dict[str, AgentOutput | AgentFailure] = {o.agent_id: o for o in result.outputs}
    outcomes.update({f.agent_id: f for f in result.failures})
    context = requests[0].context if requests else None
    doc = {
        "schema": TRANSCRIPT_SCHEMA,
        "status": "interrupted"
        if state.get("interrupted")
        else ("halted" if halted is not None else "completed"),
        "halt_reason": halted,
        "batch_id": str(result.batch_id),
        "started_at": result.started_at.isoformat(),
        "completed_at": result.completed_at.isoformat(),
        "total_ms": result.total_ms,
        "backend": args.backend,
        "model": args.model if args.backend == "openai" else None,
        "topic": None
        if context is None
        else {
            "topic_id": context.topic_id,
            "bundle_id": str(context.bundle_id),
            "content_sha256": _sha256(context.topic_content),
        },
        "counts": {
            "total": result.total_count,
            "succeeded": result.success_count,
            "failed": result.failure_count,
            "by_kind": dict(Counter(f.kind.value for f in result.failures)),
        },
        "pool_after": pool.status().as_dict(),
        "outcomes": [
            _outcome_record(outcomes[r.agent_id], args.include_content)
            for r in requests
            if r.agent_id in outcomes
        ],
    }
    # Write-then-rename: a reader (or a Ctrl-C) never sees a half-written transcript.
    write_atomically(args.json_path, (json.dumps(doc, indent=2) + "\n").encode())


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- halt / clear / status


async def halt_command(args: argparse.Namespace) -> int:
    from adapters.file_halt import FileHaltChannel

    channel = FileHaltChannel(args.halt_file)
    if await channel.ahalt(args.reason):
        print(f"halted: {args.reason}")
        if channel.kept_aside is not None:
            print(f"the unreadable halt file was kept as {channel.kept_aside}")
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
        if state.error is not None:
            print("  `conclave halt` rewrites it as a readable halted file; then it can be cleared")
    else:
        print("not halted")
    for record in state.history[-5:]:
        who = f" by {', '.join(record.approvers)}" if record.approvers else ""
        print(f"  {record.at.isoformat()} {record.action}{who}: {record.reason}")
    return EXIT_HALTED if state.halted else EXIT_OK


async def verify_command(args: argparse.Namespace) -> int:
    from adapters.sqlite_witness import verify_log

    # Read-only: refuses (exit 2) anything that is not a witness log, never creates one.
    report = await trio.to_thread.run_sync(verify_log, args.db, args.expected_head)
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
    except UsageError as exc:
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ConclaveError as exc:  # bad input, refused admission, denied clear
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # e.g. the transcript or halt file cannot be written
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("conclave: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
