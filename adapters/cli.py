"""``conclave``: run a deliberation from the command line.

Exit codes: 0 all agents succeeded, 1 some failed, 2 bad usage or input, 3 halted.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from adapters.roster import Roster
from adapters.stub import AgentOrchestratorStub
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentInvocationError,
    AgentOrchestratorProtocol,
    AgentPool,
    ConclaveError,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_HALTED = 0, 1, 2, 3


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="conclave", description="Run a council of agents on one topic.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("deliberate", help="run one deliberation and print a summary")
    d.add_argument("--agents", type=_positive_int, default=MAX_CONCURRENT_AGENTS)
    d.add_argument("--topic", default="Should the council adopt the proposal?")
    d.add_argument("--latency-ms", type=_non_negative_float, default=100.0)
    d.add_argument(
        "--capacity",
        type=_positive_int,
        default=MAX_CONCURRENT_AGENTS,
        help="pool size (FR10 default: 72)",
    )
    d.add_argument("--overflow", choices=("reject", "queue"), default="reject")
    d.add_argument(
        "--timeout", type=_non_negative_float, default=None, help="per-agent timeout in seconds"
    )
    d.add_argument("--backend", choices=("stub", "openai"), default="stub")
    d.add_argument("--base-url", help="OpenAI-compatible endpoint (openai backend)")
    d.add_argument("--model", help="model name (openai backend)")
    d.add_argument("--roster", help="roster file (.json or .toml); sets the agents")
    d.add_argument("--max-tokens", type=_positive_int, default=None)
    return parser


def _summary(
    result: ConcurrentResult, latency_ms: float, pool: AgentPool, halted: str | None
) -> str:
    kinds = Counter(f.kind.value for f in result.failures)
    lines = [
        f"conclave: {result.total_count} agents, batch {result.batch_id}",
        f"  succeeded : {result.success_count}",
        f"  failed    : {result.failure_count}"
        + (" (" + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items())) + ")" if kinds else ""),
        f"  batch time: {result.total_ms:.1f} ms"
        + (
            f" (ideal {latency_ms:.1f} ms, x{result.total_ms / latency_ms:.2f})"
            if latency_ms
            else ""
        ),
        f"  pool after: {pool.active_count} active, {pool.available_count}/"
        f"{pool.max_concurrent} free",
    ]
    if halted is not None:
        lines.insert(1, f"  HALTED    : {halted}")
    return "\n".join(lines)


@asynccontextmanager
async def _orchestrator(
    args: argparse.Namespace, roster: Roster | None
) -> AsyncIterator[AgentOrchestratorProtocol]:
    if args.backend == "stub":
        yield AgentOrchestratorStub(latency_ms=args.latency_ms)
        return
    # Imported here: the stub path needs neither openai nor trio-asyncio.
    from adapters.asyncio_bridge import AsyncioOrchestratorBridge
    from adapters.openai_chat import OpenAIChatOrchestrator

    if not args.base_url or not args.model:
        raise _UsageError("--backend openai needs --base-url and --model")
    inner = OpenAIChatOrchestrator(
        args.base_url,
        args.model,
        roster=roster,
        max_tokens=args.max_tokens,
        **({"timeout_s": args.timeout} if args.timeout else {}),
    )
    async with AsyncioOrchestratorBridge(inner) as bridge:
        await bridge.run_asyncio(inner.check_reachable)
        yield bridge


async def _deliberate(args: argparse.Namespace) -> int:
    roster = Roster.load(args.roster) if args.roster else Roster.default(args.agents)
    pool = AgentPool(args.capacity)
    context = ContextBundle(topic_id="cli-topic", topic_content=args.topic)
    requests = roster.requests(context)
    ideal_ms = args.latency_ms if args.backend == "stub" else 0.0
    async with _orchestrator(args, roster if args.roster else None) as orchestrator:
        service = ConcurrentDeliberationService(
            orchestrator, HaltSwitch(), pool, agent_timeout=args.timeout or None
        )
        try:
            result = await service.invoke_concurrent(requests, overflow=args.overflow)
        except SystemHaltedError as exc:
            if exc.partial is not None:
                print(_summary(exc.partial, ideal_ms, pool, exc.reason))
            else:
                print(f"conclave: halted: {exc.reason}", file=sys.stderr)
            return EXIT_HALTED
    print(_summary(result, ideal_ms, pool, None))
    if result.failures:
        for failure in result.failures[:5]:
            print(f"  ! {failure.agent_id}: {failure.kind.value}: {failure.message}")
    return EXIT_OK if result.failure_count == 0 else EXIT_FAILURES


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return trio.run(_deliberate, args)
    except _UsageError as exc:
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InvalidRequestError, AgentInvocationError, ConclaveError) as exc:
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
