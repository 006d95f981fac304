"""What ``conclave deliberate`` shows: the live progress line, the summary, the log format.

Display only: it reads counters and results and writes to the terminal; it decides
nothing about the run.  ``rich`` is imported where it is used, so a ``--quiet`` run
never loads it.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TextIO

import attrs
import trio

from adapters.llm.failures import failure_causes
from adapters.usage import PriceTable, TokenCount, UsageTotals, usage_of, usage_totals
from kernel import RESUMED, AgentFailure, AgentPool, ConcurrentResult, FailureKind, PoolStatus

if TYPE_CHECKING:
    from adapters.llm.provider_budget import LimitStats

__all__ = [
    "LOG_FORMATS",
    "JsonFormatter",
    "KeyValueFormatter",
    "Progress",
    "announce",
    "announce_setup",
    "configure_logging",
    "failure_lines",
    "live_display",
    "print_summary",
]


class Progress:
    """Counters the progress display reads (updated by on_progress)."""

    def __init__(self, total: int, pool: AgentPool, agent_ids: Sequence[str] = ()) -> None:
        self.total = total
        self.pool = pool
        self.done = 0
        self.failed = 0
        #: The agents without an outcome yet, in request order (the tail an operator
        #: waits on is worth naming).
        self.waiting: dict[str, None] = dict.fromkeys(agent_ids)
        self.started: float | None = None
        self.answered_after: list[float] = []

    def start(self) -> None:
        """The batch begins: the clock starts here, not while the backend was set up."""
        self.started = trio.current_time()

    def __call__(self, done: int, total: int, agent_id: str, status: str) -> None:
        self.done = done  # the service counts finished agents; only failures are ours
        self.waiting.pop(agent_id, None)
        if status == "failed":
            self.failed += 1
        else:  # an answer, this long after the batch began (--hedge-after auto learns it)
            self.answered_after.append(self.elapsed)

    @property
    def elapsed(self) -> float:
        return 0.0 if self.started is None else trio.current_time() - self.started

    def waiting_on(self, most: int = 4) -> str:
        """``"archon-3, archon-9 +2"``: the agents still without an outcome, once few are
        left (empty while many are)."""
        if not self.waiting or len(self.waiting) > 2 * most:
            return ""
        names = list(self.waiting)
        more = f" +{len(names) - most}" if len(names) > most else ""
        return ", ".join(names[:most]) + more


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
            (f" · waiting on {plain(tail)}" if (tail := progress.waiting_on()) else "", "dim"),
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
    if sys.stderr.isatty() and have_rich():
        nursery.start_soon(live_display, progress)
    print(
        f"conclave: deliberating with {progress.total} agents ({backend} backend)",
        file=sys.stderr,
        flush=True,
    )


def have_rich() -> bool:
    """Whether the ``cli`` extra (rich) is installed: without it the command runs the
    same, with plain lines instead of the live line and the table."""
    return importlib.util.find_spec("rich") is not None


def announce_setup(what: str) -> None:
    """One line on a terminal's stderr before a slow set-up (a server probed, CrewAI
    imported), so an operator never looks at a blank screen wondering whether anything
    runs.  Not in a pipe: there an error stays the one line a script reads."""
    if sys.stderr.isatty():
        print(f"conclave: {what} ...", file=sys.stderr, flush=True)


@attrs.frozen
class _Summary:
    """What the summary says, once, for the one-line and the table form alike."""

    status: str
    failures: list[AgentFailure]  # not counting the agents a quorum did not need
    by_kind: str
    not_needed: int
    timing: str
    pool_line: str
    limits_line: str | None
    usage_line: str | None = None

    @classmethod
    def of(
        cls,
        result: ConcurrentResult,
        halt_reason: str | None,
        pool_after: PoolStatus,
        ideal_ms: float | None,
        rate_limits: LimitStats | None,
        prices: PriceTable | None = None,
    ) -> _Summary:
        # Agents cancelled because the quorum was reached are not failures: the run did
        # what was asked.  They get a line of their own, and no "!" lines.
        failures = [f for f in result.failures if f.kind is not FailureKind.CANCELLED]
        kinds = Counter(f.kind.value for f in failures)
        timing = f"{result.total_ms:.1f} ms"
        if ideal_ms:
            timing += f" (ideal {ideal_ms:.1f} ms, x{result.total_ms / ideal_ms:.2f})"
        pool_line = (
            f"{pool_after.active_count} active, "
            f"{pool_after.available_count}/{pool_after.max_concurrent} free"
        )
        if pool_after.shared_capacity is not None:  # --shared-capacity: the cluster's too
            in_use = "?" if pool_after.shared_in_use is None else pool_after.shared_in_use
            pool_line += f"; cluster {in_use}/{pool_after.shared_capacity} in use"
        status = "completed with failures" if failures else "completed"
        limits_line = None
        if rate_limits is not None:
            limits_line = (
                f"{rate_limits.waited_ms / 1000:.1f} s waiting for budget (all agents), "
                f"{rate_limits.responses_429} x HTTP 429"
            )
        return cls(
            status="HALTED" if halt_reason is not None else status,
            failures=failures,
            by_kind=", ".join(f"{k} {n}" for k, n in sorted(kinds.items())),
            not_needed=len(result.failures) - len(failures),
            timing=timing,
            pool_line=pool_line,
            limits_line=limits_line,
            usage_line=_usage_line(result, prices),
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
    to_stderr: bool = False,
    quorum: int | None = None,
    prices: PriceTable | None = None,
) -> None:
    """The run's summary on stdout (stderr with ``to_stderr``: ``--json -`` owns stdout):
    a table, or one line with ``quiet`` (or without rich); then up to five failures and
    the first ``show`` answers, each with its tokens (not with ``quiet``).  ``rate_limits``:
    what waiting for the provider's budget cost (the openai backend), shown when given.
    Tokens are shown when the answers report them, their cost when ``prices`` are given."""
    summary = _Summary.of(result, halt_reason, pool_after, ideal_ms, rate_limits, prices)
    if quiet or not have_rich():
        _print_one_line(result, summary, sys.stderr if to_stderr else sys.stdout)
        if not quiet:
            print(
                "conclave: (pip install 'conclave-kernel[cli]' for the live line and the table)",
                file=sys.stderr,
            )
        return
    _print_table(result, summary, halt_reason, quorum, show, to_stderr)


def _print_one_line(result: ConcurrentResult, summary: _Summary, file: TextIO) -> None:
    s = summary
    print(
        f"conclave: {s.status}: {result.success_count}/{result.total_count} succeeded, "
        + (f"{s.not_needed} cancelled after quorum, " if s.not_needed else "")
        + f"{len(s.failures)} failed{f' ({s.by_kind})' if s.by_kind else ''}, "
        f"{len(result.hedged_agents)} hedged, {s.timing}, pool {s.pool_line}"
        + (f", rate limits: {s.limits_line}" if s.limits_line else "")
        + (f", tokens {s.usage_line}" if s.usage_line else "")
        # The first cause, said once ("72 agents: 404 model 'x' not found at URL").
        + (f"; {failure_lines(s.failures, 1)[0]}" if s.failures else ""),
        file=file,
    )


def _print_table(
    result: ConcurrentResult,
    summary: _Summary,
    halt_reason: str | None,
    quorum: int | None,
    show: int,
    to_stderr: bool,
) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    s = summary
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
    table.add_row("status", s.status + shown)
    table.add_row("agents", str(result.total_count))
    table.add_row("succeeded", str(result.success_count))
    table.add_row("failed", str(len(s.failures)) + (f" ({s.by_kind})" if s.by_kind else ""))
    if result.hedged_agents:
        table.add_row("hedged", f"{len(result.hedged_agents)} agents got a duplicate call")
    if s.not_needed:
        of = f" of {quorum}" if quorum is not None else ""
        table.add_row("cancelled", f"{s.not_needed} after quorum{of} (not needed)")
    table.add_row("batch time", s.timing)
    if s.limits_line:
        table.add_row("rate limits", s.limits_line)
    if s.usage_line:
        table.add_row("tokens", s.usage_line)
    table.add_row("pool after", s.pool_line)
    console = Console(highlight=False, soft_wrap=True, stderr=to_stderr)
    console.print(table)
    for line in failure_lines(s.failures):
        console.print(f"  ! {line}", markup=False)
    for output in result.outputs[: max(show, 0)]:
        used = usage_of(output)
        tokens = f" {_tokens(used.tokens)}" if used is not None else ""
        console.print(f"\n[bold]{escape(output.agent_id)}[/bold]:{escape(tokens)}")
        console.print(plain(output.content, newlines=True), markup=False)


def _tokens(tokens: TokenCount) -> str:
    return f"{tokens.prompt:,} prompt + {tokens.completion:,} completion tokens"


def _usage_line(result: ConcurrentResult, prices: PriceTable | None) -> str | None:
    """``1,234 prompt + 567 completion tokens (2 estimated), $0.0012``: what this run's
    answers spent (a resumed answer was paid for by the run that made it: left out,
    counted); None when no answer of this run reported any."""
    resumed = {o.agent_id for o in result.outputs if o.metadata.get(RESUMED) is True}
    spent = tuple(u for u in usage_totals(result).per_agent if u.agent_id not in resumed)
    usage = UsageTotals(spent)
    if not usage.per_agent:
        return None
    line = _tokens(usage.total)
    if usage.estimated_agents:
        line += f" ({usage.estimated_agents} estimated)"
    if prices is not None:
        cost = usage.cost(prices)
        line += f", ${cost.total_usd:.4f}"
        if cost.unpriced_models:
            unpriced = ", ".join(plain(str(m)) for m in cost.unpriced_models)
            line += f" (no price for {unpriced})"
    if resumed:
        line += f" ({len(resumed)} resumed answer{'s' if len(resumed) > 1 else ''} not counted)"
    return line


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
            line += " " + " ".join(f"{k}={_shown(v)}" for k, v in sorted(extras.items()))
        return line


def _shown(value: object) -> str:
    """A field's text for a key=value log line: quoted (repr: control characters escaped,
    so a field cannot forge a line) when it has a space or anything unprintable, whatever
    its type (a Path, an exception); never raising."""
    text = value if isinstance(value, str) else _text_of(value)
    return repr(text) if " " in text or not text.isprintable() else text


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC, ISO 8601), ``level``, ``logger``,
    ``message``, then every ``extra=`` field as a key of its own (a value JSON cannot hold
    as it is, NaN included, as its ``str``).  An extra named like one of the four is kept as
    ``extra.<name>``: the record's own keys are never overwritten."""

    _STANDARD = KeyValueFormatter._STANDARD
    _CORE = ("time", "level", "logger", "message")

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in sorted(vars(record).items()):
            if key not in self._STANDARD:
                doc[f"extra.{key}" if key in self._CORE else key] = value
        if record.exc_info:
            doc["exc_info"] = self.formatException(record.exc_info)
        try:
            return _dumps(doc)
        except (TypeError, ValueError, RecursionError):
            # One field JSON cannot hold (NaN, a cycle, a key that is not text, a str()
            # that raises) must not lose the record: that field becomes its text.
            return _dumps({k: _json_field(v) for k, v in doc.items()})


def _dumps(doc: object) -> str:
    # ensure_ascii: a control character or bidi override in a field stays an escape, so
    # one record is always one line; allow_nan=False: NaN is not JSON, a reader refuses it.
    return json.dumps(doc, default=_text_of, ensure_ascii=True, allow_nan=False)


def _json_field(value: object) -> object:
    try:
        _dumps(value)
    except (TypeError, ValueError, RecursionError):
        return _text_of(value)
    return value


def _text_of(value: object) -> str:
    try:
        return str(value)
    except Exception:  # a field's own __str__ must not cost the record
        return f"<{type(value).__name__}: unprintable>"


#: ``--log-format``'s choices.
LOG_FORMATS = ("text", "json")


def configure_logging(level: str | None, log_format: str = "text") -> None:
    """Send the ``kernel`` and ``adapters`` logs at ``level`` and above to stderr, one
    line each with their ``extra=`` fields (``log_format`` ``"json"``: one JSON object a
    line); ``None`` leaves logging alone (silent)."""
    if level is None:
        return
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("kernel", "adapters"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(level.upper())
