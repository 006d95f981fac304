"""A hostile review of the adapters and the CLI (issues 9-11): each test is a defect found
by attacking them, shown failing before its fix.  CLI items run as subprocesses."""

from __future__ import annotations

import json
import logging
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import trio
import trio.testing

from adapters.cli._display import KeyValueFormatter, print_summary
from adapters.halt.file import FileHaltChannel
from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from adapters.roster import Roster, RosterError
from adapters.witness.sqlite import SqliteWitness, WitnessError, verify_log
from kernel import (
    AgentFailure,
    AgentOutput,
    AgentPool,
    AgentRequest,
    ConcurrentDeliberationService,
    ConcurrentResult,
    ContextBundle,
    DualChannelHaltChecker,
    FailureKind,
    HaltSwitch,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support import ROOT
from tests.support.cli import CONCLAVE, conclave, deliberating, halt_from_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.helpers import ScriptedOrchestrator, make_requests
from tests.support.witness_helpers import make_log, run_sql, select

HUGE = 10**400  # a valid JSON number; no float holds it

# ---------------------------------------------------------------- numbers too large for a float


@pytest.mark.parametrize("field", ["timeout_s", "max_tokens"])
def test_a_roster_number_too_large_for_a_float_is_a_roster_error(field: str) -> None:
    """Was: ``OverflowError`` out of ``Roster.from_dict`` / ``Roster.load``."""
    with pytest.raises(RosterError, match=f"field '{field}'"):
        Roster.from_dict({"agents": [{"agent_id": "a", field: HUGE}]})


def test_the_cli_refuses_such_a_roster_in_one_line(tmp_path: Path) -> None:
    """Was: a traceback (``OverflowError``), exit 1."""
    roster = tmp_path / "big.json"
    roster.write_text(json.dumps({"agents": [{"agent_id": "a", "timeout_s": HUGE}]}))
    proc = conclave("deliberate", "--roster", str(roster), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "field 'timeout_s'" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    "setting", ["timeout_s", "backoff_base_s", "backoff_cap_s", "retry_after_cap_s"]
)
def test_an_orchestrator_setting_too_large_for_a_float_is_invalid(setting: str) -> None:
    """Was: ``OverflowError`` out of the constructor."""
    settings: dict[str, Any] = {setting: HUGE}
    with pytest.raises(InvalidRequestError, match=setting):
        OpenAIChatOrchestrator("http://127.0.0.1:9/v1", "m", **settings)


# ---------------------------------------------------------------- CLI: refusals before opening


def test_a_quorum_larger_than_the_council_is_refused_before_anything_is_opened(
    tmp_path: Path,
) -> None:
    """Was: refused by the kernel only after the run had started: "deliberating with 5
    agents" printed, the witness log created (and, with --backend openai, the server
    probed), the error not naming the flag."""
    witness = tmp_path / "w.db"
    proc = conclave(
        "deliberate", "--agents", "5", "--quorum", "6", "--latency-ms", "1",
        "--witness-db", str(witness),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "conclave: --quorum 6: quorum must be between 1 and the batch size (5), got 6"
    ]
    assert proc.stdout == ""
    assert not witness.exists()


# ---------------------------------------------------------------- audit: a view is not a log


def test_verify_refuses_a_view_named_outputs(tmp_path: Path) -> None:
    """Was: "ok: 0 records, chain intact" (exit 0) for a database whose ``outputs`` is a
    view with the witness's column names: an audit must fail on what is not a log."""
    make_log(tmp_path / "real.db", 1)
    columns = [row[1] for row in select(tmp_path / "real.db", "PRAGMA table_info(outputs)")]
    db_path = tmp_path / "view.db"
    nulls = ", ".join(f"NULL AS {c}" for c in columns)
    run_sql(db_path, f"CREATE VIEW outputs AS SELECT {nulls} WHERE 0")
    before = db_path.read_bytes()
    with pytest.raises(WitnessError, match="not a witness log"):
        verify_log(db_path)
    proc = conclave("verify", str(db_path))
    assert proc.returncode == 2, proc.stdout
    assert "not a witness log" in proc.stderr and "Traceback" not in proc.stderr
    assert db_path.read_bytes() == before


# ---------------------------------------------------------------- CLI: names and reasons are text


def test_an_agent_id_with_rich_markup_is_shown_not_parsed(tmp_path: Path) -> None:
    """Was: ``--show`` crashed with ``rich.errors.MarkupError`` (a traceback, exit 1) on a
    roster id such as ``a[/oops]``, which the roster accepts (printable)."""
    roster = tmp_path / "r.json"
    roster.write_text(json.dumps({"agents": [{"agent_id": "a[/oops]"}, {"agent_id": "b"}]}))
    proc = conclave("deliberate", "--roster", str(roster), "--latency-ms", "1", "--show", "2")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "a[/oops]:" in proc.stdout


def test_a_halt_reason_with_rich_markup_is_shown_not_parsed(tmp_path: Path) -> None:
    """Was: the halted run's summary crashed with ``MarkupError`` (a traceback, exit 1
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
    """Was: the reason of a halt file (anyone who can write it chooses it) went to the
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
    """Was: a field without a space (``halt_reason="a\\nforged"``) was written raw."""
    formatter = KeyValueFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.makeLogRecord(
        {"levelname": "CRITICAL", "name": "kernel.halt", "msg": "halt raised"}
    )
    record.halt_reason = "evil\x1b[2J\nCRITICAL\tkernel.halt:forged"
    line = formatter.format(record)
    assert line.isprintable(), line


# ---------------------------------------------------------------- witness: not a file


def test_an_in_memory_witness_is_refused_when_opened() -> None:
    """Was: accepted; its reader and writer connections are two separate in-memory
    databases, so every commit failed ("no such table": every agent a WITNESS failure,
    ``conclave deliberate --witness-db :memory:`` exit 1) and nothing was ever kept."""
    with pytest.raises(InvalidRequestError, match="memory"):
        SqliteWitness(":memory:")
    proc = conclave("deliberate", "--agents", "2", "--latency-ms", "1", "--witness-db", ":memory:")
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and "memory" in proc.stderr


# ---------------------------------------------------------------- halt file on a hung filesystem


class HungFileChannel(FileHaltChannel):
    """A halt file on a filesystem that stopped answering (a hard NFS mount, a stuck FUSE
    daemon): its reads block until ``gate`` opens."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(path)
        self.gate = gate

    def _read_bytes(self) -> bytes | None:
        self.gate.wait()
        return super()._read_bytes()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Opened by the test's end at the latest; a safety net, not a synchronisation."""
    event = threading.Event()
    timer = threading.Timer(30.0, event.set)
    timer.start()
    yield event
    event.set()
    timer.cancel()


async def test_a_hung_halt_file_read_is_bounded_by_the_read_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, gate: threading.Event
) -> None:
    """Was: the read ran in a worker thread trio could not abandon, so ``halt_read_timeout``
    could not end it: the batch waited for the filesystem (then ran, the file being
    clear), and so did a dual checker however fast its other channel answered."""
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(
        orchestrator, HungFileChannel(tmp_path / "halt.json", gate), halt_read_timeout=0.5
    )
    with pytest.raises(SystemHaltedError, match=r"did not answer within 0\.5 s"):
        await service.invoke_concurrent(make_requests(2))
    assert not gate.is_set() and orchestrator.invoked == []

    dual = DualChannelHaltChecker(
        HaltSwitch(), HungFileChannel(tmp_path / "halt.json", gate), read_timeout=0.5
    )
    assert await dual.is_halted()
    assert not gate.is_set()


# ---------------------------------------------------------------- CLI: Ctrl-C while setting up


def test_ctrl_c_while_a_busy_server_is_probed_stops_at_once(
    llm_server: FakeOpenAIServer,
) -> None:
    """Was: the first Ctrl-C was only a halt for the batch to come, so the CLI sat out the
    reachability probe (up to --timeout, 60 s by default: measured 20.4 s with
    --timeout 20), said it was "deliberating", and only then stopped."""
    llm_server.models_fault = "hang"
    proc = subprocess.Popen(
        [
            *CONCLAVE, "deliberate", "--backend", "openai", "--base-url", llm_server.base_url,
            "--model", "m", "--timeout", "60", "--agents", "2",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    try:
        assert llm_server.wait_for(lambda s: s.requests_total >= 1, 30)  # the probe is out
        proc.send_signal(signal.SIGINT)
        t_signal = time.monotonic()
        stdout, stderr = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - t_signal
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert stdout == ""
    assert stderr.splitlines() == ["conclave: halted before starting: operator interrupt (SIGINT)"]
    assert stopped_after < 10.0  # interpreter exit; before: the whole --timeout
    assert llm_server.wait_for(lambda s: s.disconnects >= 1, 10)  # the probe was closed


@pytest.mark.parametrize(
    "schema",
    ["CREATE TABLE users (name TEXT)", "CREATE TABLE outputs (id INTEGER, x TEXT)"],
)
def test_the_witness_refuses_a_database_that_is_not_a_witness_log_and_changes_nothing(
    tmp_path: Path, schema: str
) -> None:
    """Was: ``--witness-db app.db`` (a slip of the finger) added the witness's tables to
    the application's database and switched it to WAL; with a different ``outputs`` table
    every agent became a ``WITNESS`` failure (exit 1) instead of one clear refusal."""
    db_path = tmp_path / "app.db"
    run_sql(db_path, schema)
    before = db_path.read_bytes()
    with pytest.raises(WitnessError, match="not a witness log"):
        SqliteWitness(db_path)
    proc = conclave(
        "deliberate", "--agents", "2", "--latency-ms", "1", "--witness-db", str(db_path)
    )
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and "not a witness log" in proc.stderr
    assert db_path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.db"]  # no -wal, no -shm


async def test_the_witness_still_opens_a_new_file_an_empty_file_and_its_own_log(
    tmp_path: Path,
) -> None:
    for name in ("new.db", "empty.db"):
        path = tmp_path / name
        if name == "empty.db":
            path.touch()
        for _ in range(2):  # made, then reopened as a witness log
            async with SqliteWitness(path) as witness:
                await witness.commit(AgentOutput(agent_id="a", request_id=uuid4(), content="x"))
        assert verify_log(path).records == 2


async def test_the_witness_opens_an_sqlite_file_with_nothing_in_it_yet(tmp_path: Path) -> None:
    """(Another process may have created the file and not yet its tables.)"""
    path = tmp_path / "fresh.db"
    run_sql(path, "PRAGMA journal_mode=WAL")
    assert path.stat().st_size > 0
    async with SqliteWitness(path) as witness:
        await witness.commit(AgentOutput(agent_id="a", request_id=uuid4(), content="x"))
    assert verify_log(path).records == 1


# ---------------------------------------------------------------- an answer that is not Unicode


async def test_an_answer_holding_a_lone_surrogate_is_that_agents_failure(
    llm_server: FakeOpenAIServer,
) -> None:
    """Was: released as an output whose ``content_hash`` raised ``UnicodeEncodeError``
    (JSON can carry ``"\\ud800"``; the SDK does not refuse it)."""
    llm_server.default = ("content", "bad \ud800 answer")
    inner = OpenAIChatOrchestrator(llm_server.base_url, "m", timeout_s=5.0)
    async with AsyncioOrchestratorBridge(inner) as bridge:
        service = ConcurrentDeliberationService(bridge)
        result = await service.invoke_concurrent(make_requests(2))
    assert result.success_count == 0
    assert {f.kind for f in result.failures} == {FailureKind.ERROR}
    assert all("Unicode" in f.message for f in result.failures)


def test_the_cli_reports_such_answers_instead_of_crashing(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Was: a ``UnicodeEncodeError`` traceback after the run (exit 1): no summary, no
    transcript."""
    llm_server.default = ("content", "bad \ud800 answer")
    transcript = tmp_path / "run.json"
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", llm_server.base_url, "--model", "m",
        "--agents", "2", "--json", str(transcript), "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "0/2 succeeded, 2 failed (error 2)" in proc.stdout
    assert json.loads(transcript.read_text())["status"] == "completed"
