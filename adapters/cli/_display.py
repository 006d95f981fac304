"""What ``conclave deliberate`` shows: the live progress line, the summary, the log format.

Display only: it reads counters and results and writes to the terminal; it decides
nothing about the run.  ``rich`` is imported where it is used, so a ``--quiet`` run
never loads it.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import trio

from adapters.llm.failures import failure_causes
from kernel import AgentFailure, AgentPool, ConcurrentResult, PoolStatus

if TYPE_CHECKING:
    from adapters.llm.provider_budget import LimitStats

__all__ = [
    "KeyValueFormatter",
    "Progress",
    "announce",
    "configure_logging",
    "failure_lines",
    "live_display",
    "print_summary",
]


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


async def live_display(progress: Progress) -> None:
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


def plain(text: str, *, newlines: bool = False) -> str:
    """``text`` safe for the terminal: every non-printable character (an escape sequence,
    a newline that would forge a line, a bidi override) shown as its Python escape.
    ``newlines`` keeps line breaks (an agent's answer).  Reasons, messages and answers
    come from outside: a halt file, a server, a model."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() or (newlines and c == "\n") else c.encode("unicode_escape").decode()
        for c in text
    )


def announce(nursery: trio.Nursery, progress: Progress, *, backend: str) -> None:
    """Say on stderr that the batch is on (a plain line, also when stderr is not a
    terminal), and on a terminal start the live line in ``nursery``."""
    if sys.stderr.isatty():
        nursery.start_soon(live_display, progress)
    print(
        f"conclave: deliberating with {progress.total} agents ({backend} backend)",
        file=sys.stderr,
        flush=True,
    )


def print_summary(
    result: ConcurrentResult,
    *,
    halt_reason: str | None,
    pool_after: PoolStatus,
    ideal_ms: float | None,
    quiet: bool,
    show: int,
    rate_limits: LimitStats | None = None,
) -> None:
    """The run's summary on stdout: a table, or one line with ``quiet``; then up to five
    failures and the first ``show`` answers (not with ``quiet``).  ``rate_limits``: what
    waiting for the provider's budget cost (the openai backend), shown when given."""
    kinds = Counter(f.kind.value for f in result.failures)
    by_kind = ", ".join(f"{k} {n}" for k, n in sorted(kinds.items()))
    timing = f"{result.total_ms:.1f} ms"
    if ideal_ms:
        timing += f" (ideal {ideal_ms:.1f} ms, x{result.total_ms / ideal_ms:.2f})"
    pool_line = (
        f"{pool_after.active_count} active, "
        f"{pool_after.available_count}/{pool_after.max_concurrent} free"
    )
    if pool_after.shared_capacity is not None:  # --shared-capacity: the cluster's count too
        in_use = "?" if pool_after.shared_in_use is None else pool_after.shared_in_use
        pool_line += f"; cluster {in_use}/{pool_after.shared_capacity} in use"
    if halt_reason is not None:
        status = "HALTED"
    else:
        status = "completed with failures" if result.failures else "completed"
    limits_line = None
    if rate_limits is not None:
        limits_line = (
            f"{rate_limits.waited_ms / 1000:.1f} s waiting for budget (all agents), "
            f"{rate_limits.responses_429} x HTTP 429"
        )
    if quiet:
        print(
            f"conclave: {status}: {result.success_count}/{result.total_count} succeeded, "
            f"{result.failure_count} failed{f' ({by_kind})' if by_kind else ''}, "
            f"{len(result.hedged_agents)} hedged, {timing}, pool {pool_line}"
            + (f", rate limits: {limits_line}" if limits_line else "")
            + (f"; {failure_lines(result.failures, 1)[0]}" if result.failures else "")
        )
        return
    from rich.console import Console
    from rich.markup import escape
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
    # Reasons and ids are text, never markup: "[/x]" in one would crash the summary.
    shown = f": {escape(plain(halt_reason))}" if halt_reason else ""
    table.add_row("status", status + shown)
    table.add_row("agents", str(result.total_count))
    table.add_row("succeeded", str(result.success_count))
    table.add_row("failed", str(result.failure_count) + (f" ({by_kind})" if by_kind else ""))
    if result.hedged_agents:
        table.add_row("hedged", f"{len(result.hedged_agents)} agents got a duplicate call")
    if kinds["cancelled"]:
        table.add_row("cancelled", f"{kinds['cancelled']} not needed (quorum reached)")
    table.add_row("batch time", timing)
    if limits_line:
        table.add_row("rate limits", limits_line)
    table.add_row("pool after", pool_line)
    console = Console(highlight=False, soft_wrap=True)
    console.print(table)
    for line in failure_lines(result.failures):
        console.print(f"  ! {line}", markup=False)
    for output in result.outputs[: max(show, 0)]:
        console.print(f"\n[bold]{escape(output.agent_id)}[/bold]:")
        console.print(plain(output.content, newlines=True), markup=False)


def failure_lines(failures: Sequence[AgentFailure], most: int = 5) -> list[str]:
    """The failures, each cause said once (:func:`adapters.llm.failures.failure_causes`):
    ``"72 agents: 404 model 'x' not found at URL"``; a cause of one agent as that agent's
    own failure.  At most ``most`` causes, then how many more."""
    causes = failure_causes(failures)
    lines = []
    for cause in causes[:most]:
        if cause.count == 1:
            failure = cause.failures[0]
            lines.append(f"{failure.agent_id}: {failure.kind.value}: {plain(failure.message)}")
        else:
            lines.append(plain(cause.summary()))
    rest = causes[most:]
    if rest:
        lines.append(f"... and {len(rest)} more causes ({sum(c.count for c in rest)} agents)")
    return lines


class KeyValueFormatter(logging.Formatter):
    """``time level logger message key=value ...``: the ``extra=`` fields made visible."""

    _STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in self._STANDARD}
        if extras:
            line += " " + " ".join(
                # repr() also escapes control characters: a field cannot forge a line.
                f"{k}={v!r}"
                if isinstance(v, str) and (" " in v or not v.isprintable())
                else f"{k}={v}"
                for k, v in sorted(extras.items())
            )
        return line


def configure_logging(level: str | None) -> None:
    """Send the ``kernel`` and ``adapters`` logs at ``level`` and above to stderr, one
    line each with their ``extra=`` fields; ``None`` leaves logging alone (silent)."""
    if level is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("kernel", "adapters"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
