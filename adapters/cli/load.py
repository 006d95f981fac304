"""``conclave load``: N batches against a backend, judged against the service targets.

    conclave load --batches 20 --latency-profile lognormal --latency-ms 800 --out DIR
        (DIR/load.json, DIR/load.png; or --json FILE|- and --png FILE)

Every batch is the one ``deliberate`` runs (:func:`~adapters.cli.commands.run_batch`, on
the service :func:`~adapters.cli._backend.open_service` opens from the same backend
flags), one after another on one open service.  The report gives p50/p95/p99 batch time,
the agent failure rate (agents cancelled because a quorum was reached do not count) and
pool utilisation (active / capacity, sampled every :data:`SAMPLE_S` while the batches run:
its time-weighted mean and its peak), each target PASS or FAIL:

    p95 batch time < 30 s, p99 batch time < 60 s, agent failure rate < 5 %,
    mean pool utilisation < 90 %

Exit codes: 0 every target met, 1 one missed, 2 bad usage (nothing run), 3 halted
(the batches done so far are reported), 130 interrupted.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import trio

from adapters._atomic import write_atomically
from adapters.cli import _budget as _cli_budget
from adapters.cli import _valkey as _cli_valkey
from adapters.cli import transcript
from adapters.cli._backend import (
    OperatorInterrupt,
    RateLimitReport,
    UsageError,
    halt_reason_now,
    open_service,
    require_extra,
)
from adapters.cli._display import plain
from adapters.roster import Roster
from kernel import (
    AgentPool,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
    SystemHaltedError,
    nearest_rank,
)

__all__ = ["SAMPLE_S", "TARGETS", "LoadReport", "Target", "add_options", "load_command"]

#: How often pool utilisation is sampled while the batches run.
SAMPLE_S = 0.01
EXIT_OK, EXIT_MISSED, EXIT_HALTED = 0, 1, 3
_NOT_FAILED = frozenset({FailureKind.CANCELLED, FailureKind.HALTED})


@attrs.frozen(slots=True)
class Target:
    """One service target: ``metric`` must stay below ``limit``."""

    metric: str
    label: str
    limit: float
    unit: str  # "s" or "%": how value and limit are shown


#: The seed's targets, in the order they are reported.
TARGETS = (
    Target("p95_batch_s", "p95 batch time", 30.0, "s"),
    Target("p99_batch_s", "p99 batch time", 60.0, "s"),
    Target("agent_failure_rate", "agent failure rate", 0.05, "%"),
    Target("pool_utilisation_mean", "pool utilisation (mean)", 0.90, "%"),
)


class LoadRecorder:
    """What the batches did: each batch's start and time, failures, utilisation samples.

    Owns the measuring only; the batches are run by :func:`_run_batches`."""

    def __init__(self, pool: AgentPool) -> None:
        self.pool = pool
        self.started = trio.current_time()
        self.batches: list[tuple[float, float]] = []  # (start s from the first, seconds)
        self.agents = 0
        self.failures = 0
        self.samples: list[tuple[float, float]] = []  # (s from the first batch, ratio)

    def record(self, start: float, result: ConcurrentResult) -> None:
        self.batches.append((start - self.started, result.total_ms / 1000.0))
        self.agents += result.total_count
        # Quorum-cancelled agents did what was asked; halted ones are the halt's (reported
        # as such), not the agents' failures: as the failure-rate alert counts them.
        self.failures += sum(f.kind not in _NOT_FAILED for f in result.failures)

    async def sample(self) -> None:
        """Sample the pool until cancelled."""
        while True:
            ratio = self.pool.active_count / self.pool.max_concurrent
            self.samples.append((trio.current_time() - self.started, ratio))
            await trio.sleep(SAMPLE_S)


@attrs.frozen(slots=True)
class LoadReport:
    """A load run's numbers, and each target's verdict."""

    backend: str
    agents_per_batch: int
    batch_s: tuple[float, ...]
    batch_start_s: tuple[float, ...]
    agents: int
    failures: int
    utilisation: tuple[tuple[float, float], ...]
    halted: str | None = None

    @classmethod
    def of(
        cls, recorder: LoadRecorder, *, backend: str, size: int, halted: str | None
    ) -> LoadReport:
        return cls(
            backend=backend,
            agents_per_batch=size,
            batch_s=tuple(d for _, d in recorder.batches),
            batch_start_s=tuple(s for s, _ in recorder.batches),
            agents=recorder.agents,
            failures=recorder.failures,
            utilisation=tuple(recorder.samples),
            halted=halted,
        )

    def quantile_s(self, q: float) -> float:
        return nearest_rank(self.batch_s, q) if self.batch_s else math.nan

    def values(self) -> dict[str, float]:
        ratios = [r for _, r in self.utilisation]
        return {
            "p50_batch_s": self.quantile_s(0.50),
            "p95_batch_s": self.quantile_s(0.95),
            "p99_batch_s": self.quantile_s(0.99),
            "max_batch_s": max(self.batch_s, default=math.nan),
            "agent_failure_rate": self.failures / self.agents if self.agents else math.nan,
            "pool_utilisation_mean": sum(ratios) / len(ratios) if ratios else math.nan,
            "pool_utilisation_peak": max(ratios, default=math.nan),
        }

    def verdicts(self) -> list[tuple[Target, float, bool]]:
        """Each target with its value; a value not measured (nan) misses it."""
        values = self.values()
        return [(t, values[t.metric], values[t.metric] < t.limit) for t in TARGETS]

    @property
    def passed(self) -> bool:
        return self.halted is None and all(ok for _, _, ok in self.verdicts())

    def as_dict(self) -> dict[str, Any]:
        def number(x: float) -> float | None:
            return None if math.isnan(x) else round(x, 6)

        return {
            "schema": "conclave.load/1",
            "backend": self.backend,
            "batches": len(self.batch_s),
            "agents_per_batch": self.agents_per_batch,
            "agents": self.agents,
            "failures": self.failures,
            "halt_reason": self.halted,
            **{k: number(v) for k, v in self.values().items()},
            "targets": [
                {"metric": t.metric, "below": t.limit, "value": number(v), "passed": ok}
                for t, v, ok in self.verdicts()
            ],
            "passed": self.passed,
            "batch_s": [round(x, 6) for x in self.batch_s],
            "batch_start_s": [round(x, 6) for x in self.batch_start_s],
        }


def _shown(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value * 100:.1f} %" if unit == "%" else f"{value:.2f} s"


def render(report: LoadReport) -> str:
    """The report as text, one target a line."""
    v = report.values()
    lines = [
        f"conclave load: {len(report.batch_s)} batches x {report.agents_per_batch} agents "
        f"({report.backend})",
        f"batch time: p50 {_shown(v['p50_batch_s'], 's')}, p95 {_shown(v['p95_batch_s'], 's')}, "
        f"p99 {_shown(v['p99_batch_s'], 's')}, max {_shown(v['max_batch_s'], 's')}",
        f"agents: {report.agents}, failed {report.failures}; pool utilisation: "
        f"mean {_shown(v['pool_utilisation_mean'], '%')}, "
        f"peak {_shown(v['pool_utilisation_peak'], '%')}",
    ]
    for target, value, ok in report.verdicts():
        limit = _shown(target.limit, target.unit).replace(".0 %", " %").replace(".00 s", " s")
        what = f"{target.label} < {limit}"
        lines.append(f"  {'PASS' if ok else 'FAIL'}  {what:<32} {_shown(value, target.unit)}")
    if report.halted is not None:
        lines.append(f"halted: {plain(report.halted)}")
    return "\n".join(lines)


# ---------------------------------------------------------------- the command


def _path_or_dash(text: str) -> Path | str:
    return "-" if text == "-" else Path(text)


def add_options(parser: argparse.ArgumentParser) -> None:
    """``load``'s own options (the council, run, cluster, tail and backend ones are
    ``deliberate``'s, added by the caller)."""
    out = parser.add_argument_group("load")
    out.add_argument(
        "--batches", type=_batches, default=20, help="batches to run, one after another"
    )
    out.add_argument(
        "--json",
        type=_path_or_dash,
        dest="report_json",
        metavar="FILE|-",
        help="write the report as JSON (- for stdout, instead of the text)",
    )
    out.add_argument(
        "--png", type=Path, help="batch-time histogram and utilisation timeline (plot extra)"
    )
    out.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="write DIR/load.json and DIR/load.png (an existing directory)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    # What `deliberate`'s checks read and `load` does not offer.
    parser.set_defaults(
        json_path=None, metrics_port=None, metrics_push=None, otel=False, resume=None
    )


def _batches(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= 100_000:
        raise argparse.ArgumentTypeError(f"must be 1-100000, got {value}")
    return value


async def _check_outputs(args: argparse.Namespace) -> None:
    """``--out DIR`` becomes its two files (``--json``/``--png`` given too win); each
    output is checked writable, and ``--png``'s extra installed, before anything runs."""
    if args.out is not None:
        if args.report_json is None:
            args.report_json = args.out / "load.json"
        if args.png is None:
            args.png = args.out / "load.png"
    if args.png is not None:
        require_extra("plot", "--png")
    given = "--out" if args.out is not None else None
    for flag, path in ((given or "--json", args.report_json), (given or "--png", args.png)):
        if isinstance(path, Path):
            try:
                await trio.to_thread.run_sync(transcript.check_writable, path)
            except ValueError as exc:
                raise UsageError(f"{flag} {exc}") from None


async def load_command(args: argparse.Namespace) -> int:
    """Check usage as ``deliberate`` does, run the batches, report them."""
    from adapters.cli import commands  # it registers this command: imported by then

    roster_file = await commands.check_usage(args)
    await _check_outputs(args)
    async with (
        _cli_valkey.open_cluster(
            _cli_valkey.ValkeySettings.from_args(args), args.shared_capacity
        ) as cluster,
        _cli_budget.open_budget(args) as budget,  # --rpm/--tpm with --valkey: shared
    ):
        pool = cluster.pool(args.capacity)
        interrupt = OperatorInterrupt()
        checker = cluster.halt_checker(interrupt.switch, args.halt_file)
        reason = await halt_reason_now(checker)
        if reason is not None:
            print(f"conclave: halted before starting: {plain(reason)}", file=sys.stderr)
            return EXIT_HALTED
        roster = commands.council(args, roster_file, pool)
        recorder = LoadRecorder(pool)
        halted = None
        async with trio.open_nursery() as nursery:
            await nursery.start(interrupt.watch)
            async with open_service(
                commands.orchestrator(args, roster_file, roster, RateLimitReport(budget)),
                checker,
                pool,
                agent_timeout=commands.agent_timeout(args),
                witness_db=None,
                metrics_port=None,
            ) as service:
                nursery.start_soon(recorder.sample)
                print(
                    f"conclave: load: {args.batches} batches of {len(roster)} agents "
                    f"({args.backend} backend)",
                    file=sys.stderr,
                    flush=True,
                )
                halted = await _run_batches(service, args, roster, recorder)
            nursery.cancel_scope.cancel()
        await cluster.settle()
    backend = f"{args.backend} backend"
    if args.backend == "stub":
        backend += f", {args.latency_profile} latency, median {args.latency_ms:g} ms"
    if args.hedge_after is not None:
        backend += f", hedged after {args.hedge_after} s"
    report = LoadReport.of(recorder, backend=backend, size=len(roster), halted=halted)
    await _write_outputs(args, report)
    if interrupt.signal_name is not None:
        return commands.EXIT_INTERRUPTED
    if halted is not None:
        return EXIT_HALTED
    return EXIT_OK if report.passed else EXIT_MISSED


async def _run_batches(
    service: ConcurrentDeliberationService,
    args: argparse.Namespace,
    roster: Roster,
    recorder: LoadRecorder,
) -> str | None:
    """Run ``args.batches`` batches, each recorded; the halt's reason if one stopped them."""
    from adapters.cli import commands

    hedge = await commands.hedge_policy(args)
    with _progress_bar(args.batches, enabled=not args.quiet) as advance:
        for i in range(args.batches):
            context = ContextBundle(topic_id=f"{args.topic_id}-{i + 1}", topic_content=args.topic)
            start = trio.current_time()
            try:
                requests = roster.requests(context)
                result = await commands.run_batch(service, args, requests, hedge=hedge)
            except SystemHaltedError as exc:
                if exc.partial is not None:
                    recorder.record(start, exc.partial)
                return exc.reason
            recorder.record(start, result)
            advance()
    return None


@contextmanager
def _progress_bar(total: int, *, enabled: bool) -> Iterator[Any]:
    """A live bar on a terminal's stderr (rich); elsewhere a no-op."""
    if not (enabled and sys.stderr.isatty()):
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress(
        "load",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("batches", total=total)
        yield lambda: bar.advance(task)


async def _write_outputs(args: argparse.Namespace, report: LoadReport) -> None:
    if args.report_json == "-":  # the JSON owns stdout; the text goes to stderr
        print(json.dumps(report.as_dict(), indent=2))
        print(render(report), file=sys.stderr)
    else:
        print(render(report))
        if args.report_json is not None:
            data = (json.dumps(report.as_dict(), indent=2) + "\n").encode()
            await trio.to_thread.run_sync(write_atomically, args.report_json, data)
    if args.png is not None:
        await trio.to_thread.run_sync(write_png, report, args.png)


def write_png(report: LoadReport, path: Path) -> None:
    """The batch-time histogram (p50/p95/p99 and the targets marked) above the pool's
    utilisation over time (each batch's start marked).  Blocking: a worker thread."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file
    import matplotlib.pyplot as plt

    v = report.values()
    fig, (hist, line) = plt.subplots(2, 1, figsize=(9, 7), constrained_layout=True)
    hist.hist(report.batch_s, bins=min(30, max(5, len(report.batch_s))), color="#4c72b0")
    for key, style in (("p50_batch_s", ":"), ("p95_batch_s", "--"), ("p99_batch_s", "-.")):
        if not math.isnan(v[key]):
            hist.axvline(v[key], color="k", linestyle=style, label=f"{key[:3]} {v[key]:.2f} s")
    hist.set_xlabel("batch time (s)")
    hist.set_ylabel("batches")
    for target in TARGETS[:2]:  # the batch-time targets, where the data reaches them
        if max(report.batch_s, default=0) >= 0.5 * target.limit:
            hist.axvline(target.limit, color="r", linewidth=1.5, label=f"{target.label} target")
    hist.set_title(
        f"conclave load: {len(report.batch_s)} batches x {report.agents_per_batch} agents\n"
        f"{report.backend}"
    )
    hist.legend()
    if report.utilisation:
        ts, ratios = zip(*report.utilisation, strict=True)
        line.plot(ts, [r * 100 for r in ratios], color="#dd8452", linewidth=0.8)
    for start in report.batch_start_s:
        line.axvline(start, color="0.85", linewidth=0.5)
    line.axhline(90, color="r", linestyle="--", label="target: mean < 90 %")
    line.set_xlabel("time since the first batch (s)")
    line.set_ylabel("pool utilisation (%)")
    line.set_ylim(0, 105)
    line.legend(loc="upper right")
    image = io.BytesIO()
    fig.savefig(image, format="png", dpi=100)
    plt.close(fig)
    write_atomically(path, image.getvalue())
