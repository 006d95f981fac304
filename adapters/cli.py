"""``conclave``: run a deliberation from the command line.

Exit codes: 0 all agents succeeded, 1 some failed, 2 bad usage or input, 3 halted.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Sequence

import trio

from adapters.stub import AgentOrchestratorStub
from kernel import (
    MAX_CONCURRENT_AGENTS,
    AgentPool,
    AgentRequest,
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


async def _deliberate(args: argparse.Namespace) -> int:
    pool = AgentPool(args.capacity)
    orchestrator = AgentOrchestratorStub(latency_ms=args.latency_ms)
    service = ConcurrentDeliberationService(
        orchestrator, HaltSwitch(), pool, agent_timeout=args.timeout or None
    )
    context = ContextBundle(topic_id="cli-topic", topic_content=args.topic)
    requests = [AgentRequest(f"archon-{i + 1}", context) for i in range(args.agents)]
    try:
        result = await service.invoke_concurrent(requests, overflow=args.overflow)
    except SystemHaltedError as exc:
        if exc.partial is not None:
            print(_summary(exc.partial, args.latency_ms, pool, exc.reason))
        else:
            print(f"conclave: halted: {exc.reason}", file=sys.stderr)
        return EXIT_HALTED
    print(_summary(result, args.latency_ms, pool, None))
    return EXIT_OK if result.failure_count == 0 else EXIT_FAILURES


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return trio.run(_deliberate, args)
    except _UsageError as exc:
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (InvalidRequestError, ConclaveError) as exc:
        print(f"conclave: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
