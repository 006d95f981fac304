"""The CLI's display: progress, summary and logs show names, reasons and messages as text
(never markup, never a control character that reaches the terminal)."""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime
from pathlib import Path
from uuid import uuid4

import pytest
import trio

from adapters.cli._display import KeyValueFormatter, Progress, print_summary
from adapters.halt.file import FileHaltChannel
from kernel import (
    AgentFailure,
    AgentPool,
    AgentRequest,
    ConcurrentResult,
    ContextBundle,
    FailureKind,
)
from tests.support.cli import conclave, deliberating, halt_from_cli


def test_an_agent_id_with_rich_markup_is_shown_not_parsed(tmp_path: Path) -> None:
    """Guards against: ``--show`` crashed with ``rich.errors.MarkupError`` (a traceback, exit 1) on
    a roster id such as ``a[/oops]``, which the roster accepts (printable)."""
    roster = tmp_path / "r.json"
    roster.write_text(json.dumps({"agents": [{"agent_id": "a[/oops]"}, {"agent_id": "b"}]}))
    proc = conclave("deliberate", "--roster", str(roster), "--latency-ms", "1", "--show", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "a[/oops]:" in proc.stdout


def test_a_halt_reason_with_rich_markup_is_shown_not_parsed(tmp_path: Path) -> None:
    """Guards against: the halted run's summary crashed with ``MarkupError`` (a traceback, exit 1
    instead of 3) on a reason such as ``[/oops] stop``."""
    halt_file = tmp_path / "halt.json"
    with deliberating("--latency-ms", "600000", "--halt-file", str(halt_file)) as proc:
        halt_from_cli(halt_file, "[/oops] stop")
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3, stderr
    assert "Traceback" not in stderr
    assert re.search(r"status\s+HALTED: \[/oops\] stop", stdout)


HOSTILE = "evil\x1b[2J\x1b[31mRED\nconclave: forged line"


def _no_control(text: str) -> bool:
    return all(c.isprintable() or c == "\n" for c in text) and "\nconclave: forged" not in text


def test_a_halt_reason_with_control_characters_cannot_forge_terminal_output(
    tmp_path: Path,
) -> None:
    """Guards against: the reason of a halt file (anyone who can write it chooses it) went to the
    terminal raw: escape sequences ran, and a newline forged a ``conclave:`` line.  The
    roster refuses such agent ids for this very reason."""
    halt_file = tmp_path / "halt.json"
    FileHaltChannel(halt_file).halt(HOSTILE)
    status = conclave("status", "--halt-file", str(halt_file))
    assert status.returncode == 3
    assert _no_control(status.stdout), status.stdout
    assert "evil\\x1b[2J\\x1b[31mRED\\nconclave: forged line" in status.stdout
    run = conclave("deliberate", "--halt-file", str(halt_file), "--quiet")
    assert run.returncode == 3
    assert _no_control(run.stderr) and len(run.stderr.splitlines()) == 1, run.stderr


def test_summary_failure_messages_and_reasons_cannot_forge_terminal_output(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A failure message can hold a server's words (an HTTP error body): same rule."""
    request = AgentRequest("archon-1", ContextBundle(topic_id="t", topic_content="c"))
    failure = AgentFailure(
        agent_id="archon-1",
        request_id=request.request_id,
        kind=FailureKind.ERROR,
        error_type="AgentInvocationError",
        message=HOSTILE,
        elapsed_ms=1.0,
    )
    now = datetime.now(UTC)
    result = ConcurrentResult(
        batch_id=uuid4(), outputs=(), failures=(failure,), started_at=now, completed_at=now,
        total_ms=1.0,
    )  # fmt: skip
    print_summary(
        result,
        halt_reason=HOSTILE,
        pool_after=AgentPool().status(),
        ideal_ms=None,
        quiet=False,
        show=0,
    )
    out = capsys.readouterr().out
    assert _no_control(out), out
    assert "\\x1b[2J" in out


def test_log_fields_with_control_characters_cannot_forge_log_lines() -> None:
    """Guards against: a field without a space (``halt_reason="a\\nforged"``) was written raw."""
    formatter = KeyValueFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.makeLogRecord(
        {"levelname": "CRITICAL", "name": "kernel.halt", "msg": "halt raised"}
    )
    record.halt_reason = "evil\x1b[2J\nCRITICAL\tkernel.halt:forged"
    line = formatter.format(record)
    assert line.isprintable(), line


async def test_the_batch_clock_starts_with_the_batch_not_with_the_set_up(
    autojump_clock: object,
) -> None:
    progress = Progress(2, AgentPool(), ["a", "b"])
    await trio.sleep(30)  # a slow probe, CrewAI's import
    assert progress.elapsed == 0.0
    progress.start()
    await trio.sleep(1.5)
    assert progress.elapsed == pytest.approx(1.5)


def test_the_agents_still_waited_on_are_named_once_few_are_left() -> None:
    ids = [f"archon-{i}" for i in range(1, 13)]
    progress = Progress(len(ids), AgentPool(), ids)
    assert progress.waiting_on() == ""  # 12 left: too many to name
    for done, agent in enumerate(ids[:6], 1):
        progress(done, len(ids), agent, "completed")
    assert progress.waiting_on() == "archon-7, archon-8, archon-9, archon-10 +2"
    for done, agent in enumerate(ids[6:11], 7):
        progress(done, len(ids), agent, "failed")
    assert progress.waiting_on() == "archon-12"
    assert progress.failed == 5
    progress(12, len(ids), "archon-12", "completed")
    assert progress.waiting_on() == ""
