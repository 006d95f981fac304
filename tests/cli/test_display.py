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

from adapters.cli._display import (
    JsonFormatter,
    KeyValueFormatter,
    Progress,
    failure_lines,
    print_summary,
)
from adapters.halt.file import FileHaltChannel
from adapters.stub import stub_usage
from adapters.usage import PriceTable
from kernel import (
    RESUMED,
    AgentFailure,
    AgentOutput,
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


def test_text_log_fields_that_are_not_str_cannot_forge_lines_or_lose_the_record() -> None:
    # A field is often not a str (a Path, an exception): its text was written raw, so a
    # newline in it forged a line; one whose str() raises lost the record.
    formatter = KeyValueFormatter("%(levelname)s %(name)s: %(message)s")
    for value in (
        Path("/tmp/evil\nCRITICAL kernel.halt: forged"),
        ValueError("a\rb"),
        _Unprintable(),
    ):
        record = logging.makeLogRecord({"levelname": "INFO", "name": "kernel.x", "msg": "m"})
        record.__dict__.update(agent_id="a1", field=value)
        line = formatter.format(record)
        assert line.isprintable() and "agent_id=a1" in line and "field=" in line, line


def _json_line(record: logging.LogRecord) -> dict[str, object]:
    line = JsonFormatter().format(record)
    assert "\n" not in line and line.isprintable(), line
    doc = json.loads(line)
    assert isinstance(doc, dict)
    return doc


def test_json_logs_are_one_object_a_line_with_every_extra_a_key() -> None:
    record = logging.makeLogRecord(
        {"levelname": "WARNING", "levelno": logging.WARNING, "name": "kernel.service",
         "msg": "agent %s failed", "args": ("a1",), "created": 0.25}
    )  # fmt: skip
    batch_id = uuid4()  # not JSON: shown as its text
    record.__dict__.update(agent_id="a1", elapsed_ms=12.5, batch_id=batch_id)
    doc = _json_line(record)
    assert doc == {
        "time": "1970-01-01T00:00:00.250+00:00",
        "level": "WARNING",
        "logger": "kernel.service",
        "message": "agent a1 failed",
        "agent_id": "a1",
        "elapsed_ms": 12.5,
        "batch_id": str(batch_id),
    }


def test_json_log_extras_never_overwrite_the_records_own_keys() -> None:
    record = logging.makeLogRecord({"levelname": "INFO", "name": "adapters.x", "msg": "m"})
    record.level = "forged"
    record.logger = "forged"
    doc = _json_line(record)
    assert doc["level"] == "INFO" and doc["logger"] == "adapters.x"
    assert doc["extra.level"] == "forged" and doc["extra.logger"] == "forged"


def test_json_log_fields_with_control_characters_cannot_forge_log_lines() -> None:
    record = logging.makeLogRecord({"levelname": "CRITICAL", "name": "kernel.halt", "msg": "x"})
    reason = 'evil\x1b[2J\n{"level": "INFO"}\u202e'
    record.__dict__["halt_reason"] = reason
    assert _json_line(record)["halt_reason"] == reason


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


def _strict_json(text: str) -> object:
    def refuse(name: str) -> object:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_logs_stay_one_strict_json_object_whatever_the_extras_hold() -> None:
    # What an extra holds is not the formatter's to trust: a value JSON has no number for
    # (NaN, inf), a value whose str() raises, one that holds itself, a dict keyed by
    # tuples.  Each is still one line of strict JSON, with every other field intact.
    cycle: list[object] = []
    cycle.append(cycle)
    hostile: dict[str, object] = {
        "nan": float("nan"),
        "inf": float("-inf"),
        "unprintable": _Unprintable(),
        "cycle": cycle,
        "tuple_keys": {(1, 2): "x"},
    }
    handler_errors: list[str] = []
    for key, value in hostile.items():
        record = logging.makeLogRecord({"levelname": "INFO", "name": "kernel.x", "msg": "m"})
        record.__dict__.update(agent_id="a1", **{key: value})
        try:
            line = JsonFormatter().format(record)
        except Exception as exc:
            handler_errors.append(f"{key}: {type(exc).__name__}")
            continue
        assert "\n" not in line and line.isprintable(), line
        doc = _strict_json(line)
        assert isinstance(doc, dict) and doc["agent_id"] == "a1" and key in doc, line
    assert handler_errors == []


def _stub_tokens(agent_ids: list[str], topic: str) -> tuple[int, int]:
    usages = [stub_usage(a, ContextBundle(topic_id="t", topic_content=topic)) for a in agent_ids]
    return sum(int(u["prompt_tokens"]) for u in usages), sum(
        int(u["completion_tokens"]) for u in usages
    )


def test_summary_shows_tokens_and_their_cost_at_the_flags_prices() -> None:
    prompt, completion = _stub_tokens(["archon-1", "archon-2", "archon-3"], "T")
    proc = conclave(
        *("deliberate", "--agents", "3", "--latency-ms", "1", "--topic", "T", "--quiet"),
        *("--price-prompt", "3", "--price-completion", "15"),
    )
    assert proc.returncode == 0, proc.stderr
    cost = (prompt * 3 + completion * 15) / 1e6
    expected = f"tokens {prompt:,} prompt + {completion:,} completion tokens (3 estimated)"
    assert proc.stdout.rstrip().endswith(f"{expected}, ${cost:.4f}")


def test_summary_names_the_models_without_a_price(tmp_path: Path) -> None:
    prices = tmp_path / "prices.toml"
    prices.write_text('[prices."gpt-4o"]\nprompt = 1\ncompletion = 1\n')
    proc = conclave(
        *("deliberate", "--agents", "2", "--latency-ms", "1", "--prices", str(prices)),
        "--quiet",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip().endswith(
        "completion tokens (2 estimated), $0.0000 (no price for stub)"
    )


def test_each_shown_answer_carries_its_own_tokens() -> None:
    proc = conclave(
        "deliberate", "--agents", "2", "--latency-ms", "1", "--topic", "T", "--show", "2"
    )
    assert proc.returncode == 0, proc.stderr
    for agent in ("archon-1", "archon-2"):
        prompt, completion = _stub_tokens([agent], "T")
        assert f"\n{agent}: {prompt} prompt + {completion} completion tokens\n" in proc.stdout


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


def _failure(agent_id: str, message: str) -> AgentFailure:
    return AgentFailure(agent_id, uuid4(), FailureKind.ERROR, "AgentInvocationError", message, 1.0)


def test_a_cause_of_many_agents_is_one_line_and_a_lone_failure_keeps_its_agent() -> None:
    url = "http://127.0.0.1:9/v1"
    failures = [
        *(
            _failure(f"a{i}", f"agent 'a{i}' (m at {url}): HTTP 503 after 4 attempt(s)")
            for i in range(70)
        ),
        _failure("b", f"agent 'b' (m at {url}): malformed response (no choices)"),
        *(_failure(f"c{i}", f"cause {i}\x1b[2J") for i in range(6)),
    ]
    assert failure_lines(failures) == [
        f"70 agents: error: HTTP 503 after 4 attempt(s) (m at {url})",
        f"b: error: agent 'b' (m at {url}): malformed response (no choices)",
        "c0: error: cause 0\\x1b[2J",  # never a control character to the terminal
        "c1: error: cause 1\\x1b[2J",
        "c2: error: cause 2\\x1b[2J",
        "... and 3 more causes (3 agents)",
    ]


def test_a_resumed_runs_summary_counts_only_the_tokens_this_run_spent(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Resumed answers were paid for by the run that made them: the summary's tokens and
    cost are this run's, and say how many answers they leave out."""
    usage = {"prompt_tokens": 100, "completion_tokens": 10, "model": "m"}
    now = datetime.now(UTC)
    resumed = AgentOutput("archon-1", uuid4(), "a", metadata={**usage, RESUMED: True})
    fresh = AgentOutput("archon-2", uuid4(), "b", metadata={**usage, "prompt_tokens": 7})
    result = ConcurrentResult(
        batch_id=uuid4(), outputs=(resumed, fresh), failures=(), started_at=now,
        completed_at=now, total_ms=1.0,
    )  # fmt: skip
    print_summary(
        result,
        halt_reason=None,
        pool_after=AgentPool().status(),
        ideal_ms=None,
        quiet=True,
        show=0,
        prices=PriceTable.from_mapping({"m": {"prompt": 1e6, "completion": 0}}),
    )
    out = capsys.readouterr().out
    assert "tokens 7 prompt + 10 completion tokens, $7.0000 (1 resumed answer not counted)" in out
