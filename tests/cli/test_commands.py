"""The CLI as a user runs it: subprocesses, exit codes, signals, a pseudo-terminal."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pexpect
import pytest

from adapters.roster import MAX_ROSTER_BYTES
from tests.support import ROOT
from tests.support.cli import CONCLAVE, conclave, deliberating, halt_from_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.url_secrets import SECRET, assert_never_shown
from tests.support.witness_helpers import run_sql


def test_deliberate_72_agents_prints_summary() -> None:
    proc = conclave("deliberate", "--agents", "72", "--latency-ms", "20")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert re.search(r"status\s+completed", out)
    assert re.search(r"succeeded\s+72\b", out)
    assert re.search(r"failed\s+0\b", out)
    assert "ideal 20.0 ms" in out
    assert re.search(r"pool after\s+0 active, 72/72 free", out)


def test_failures_exit_1_and_transcript_schema(tmp_path: Path) -> None:
    transcript = tmp_path / "run.json"
    proc = conclave(
        "deliberate",
        "--latency-ms",
        "5",
        "--fail-rate",
        "0.25",
        "--seed",
        "3",
        "--json",
        str(transcript),
        "--include-content",
    )
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"failed\s+18 \(error 18\)", proc.stdout)
    doc = json.loads(transcript.read_text())
    assert doc["schema"] == "conclave.transcript/1"
    assert doc["status"] == "completed" and doc["halt_reason"] is None
    assert doc["counts"] == {"total": 72, "succeeded": 54, "failed": 18, "by_kind": {"error": 18}}
    assert doc["pool_after"] == {"active_count": 0, "available_count": 72, "max_concurrent": 72}
    outcomes = doc["outcomes"]
    assert [o["agent_id"] for o in outcomes] == [f"archon-{i}" for i in range(1, 73)]
    for o in outcomes:
        assert o["status"] in ("completed", "failed") and o["request_id"]
        if o["status"] == "completed":
            assert len(o["content_hash"]) == 64 and o["content"].startswith("[DEV MODE]")
            assert o["output_id"] and o["generated_at"]
        else:
            assert o["kind"] == "error" and o["error_type"] and o["message"]
            assert o["elapsed_ms"] >= 0
    assert len(doc["topic"]["content_sha256"]) == 64


def test_transcript_holds_hashes_not_content_by_default(tmp_path: Path) -> None:
    transcript = tmp_path / "run.json"
    proc = conclave("deliberate", "--agents", "3", "--latency-ms", "1", "--json", str(transcript))
    assert proc.returncode == 0
    assert "[DEV MODE]" not in transcript.read_text()


def test_oversize_batch_is_refused_with_fr10() -> None:
    proc = conclave("deliberate", "--agents", "73", "--latency-ms", "1")
    assert proc.returncode == 2
    assert "FR10" in proc.stderr and "Traceback" not in proc.stderr


def test_queue_and_sequential_modes() -> None:
    proc = conclave("deliberate", "--agents", "100", "--latency-ms", "1", "--overflow", "queue")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"succeeded\s+100\b", proc.stdout)
    proc = conclave("deliberate", "--agents", "5", "--latency-ms", "10", "--sequential", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("conclave: completed: 5/5 succeeded")
    assert "ideal 50.0 ms" in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["deliberate", "--agents", "zero"],
        ["deliberate", "--agents", "0"],
        ["deliberate", "--latency-ms", "-5"],
        ["deliberate", "--fail-rate", "2"],
        ["deliberate", "--timeout", "0"],
        ["deliberate", "--overflow", "drop"],
        ["deliberate", "--sequential", "--overflow", "queue"],
        ["deliberate", "--roster", "/nonexistent/roster.toml"],
        ["deliberate", "--json", "/nonexistent/dir/out.json"],
        ["deliberate", "--backend", "openai", "--model", "m"],
        ["deliberate", "--backend", "crewai", "--base-url", "http://127.0.0.1:9/v1"],
        ["clear", "--halt-file", "/tmp/x.json", "--approver", "alice", "--reason", "r"],
        ["status"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_usage_exits_2_with_one_line(args: list[str]) -> None:
    proc = conclave(*args)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("conclave: ")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_roster_file_over_the_size_cap_is_a_usage_error_naming_the_cap(tmp_path: Path) -> None:
    roster = tmp_path / "council.json"
    with roster.open("wb") as f:
        f.truncate(MAX_ROSTER_BYTES + 1)  # sparse: refused by its size, never read
    proc = conclave("deliberate", "--roster", str(roster))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"conclave: {roster}: roster file of 25,600,001 bytes; "
        "at most 25,600,000 (100,000 agents x 256)\n"
    )


def test_halt_clear_status_commands(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    assert conclave("status", "--halt-file", str(halt_file)).stdout.startswith("not halted")
    proc = conclave("halt", "--halt-file", str(halt_file), "--reason", "quorum lost")
    assert proc.returncode == 0 and "halted: quorum lost" in proc.stdout
    proc = conclave("halt", "--halt-file", str(halt_file), "--reason", "again")
    assert "already halted: quorum lost" in proc.stdout
    status = conclave("status", "--halt-file", str(halt_file))
    assert status.returncode == 3 and status.stdout.startswith("HALTED: quorum lost")
    # a halted system refuses to start
    proc = conclave("deliberate", "--halt-file", str(halt_file), "--latency-ms", "1")
    assert proc.returncode == 3 and "halted before starting: quorum lost" in proc.stderr
    proc = conclave(
        "clear",
        "--halt-file",
        str(halt_file),
        "--approver",
        "alice",
        "--approver",
        "bob",
        "--reason",
        "quorum restored",
    )
    assert proc.returncode == 0 and "cleared" in proc.stdout
    status = conclave("status", "--halt-file", str(halt_file))
    assert status.returncode == 0
    assert "clear by alice, bob: quorum restored" in status.stdout


def test_a_halt_file_whose_directory_does_not_exist_is_refused_unless_created(
    tmp_path: Path,
) -> None:
    """A mistyped --halt-file would be a halt nobody watches (or a council watching a
    file nobody writes): every command refuses it, exit 2, creating nothing; halt and
    deliberate make the directory with --create."""
    typo = tmp_path / "typo" / "x" / "halt.json"
    both = ["--approver", "alice", "--approver", "bob"]
    refused = {
        "halt": conclave("halt", "--halt-file", str(typo), "--reason", "r"),
        "clear": conclave("clear", "--halt-file", str(typo), *both, "--reason", "r"),
        "status": conclave("status", "--halt-file", str(typo)),
        "deliberate": conclave("deliberate", "--halt-file", str(typo), "--latency-ms", "1"),
    }
    for command, proc in refused.items():
        assert proc.returncode == 2 and proc.stdout == "", (command, proc.stdout)
        assert proc.stderr.startswith(f"conclave: --halt-file {typo}: {typo.parent} does not ")
        assert len(proc.stderr.splitlines()) == 1
        assert ("--create makes it" in proc.stderr) == (command in ("halt", "deliberate"))
    assert not (tmp_path / "typo").exists()

    created = conclave("halt", "--halt-file", str(typo), "--create", "--reason", "audit")
    assert created.returncode == 0 and created.stdout == "halted: audit\n"
    run = conclave("deliberate", "--halt-file", str(typo), "--latency-ms", "1", "--quiet")
    assert run.returncode == 3 and "halted before starting: audit" in run.stderr
    watched = tmp_path / "new" / "halt.json"
    run = conclave("deliberate", "--halt-file", str(watched), "--create", "--agents", "2")
    assert run.returncode == 0 and watched.parent.is_dir() and not watched.exists()

    not_a_directory = tmp_path / "file"  # it exists: the channel's to report (halted)
    not_a_directory.write_text("")
    proc = conclave("halt", "--halt-file", str(not_a_directory / "h"), "--create", "--reason", "r")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert not_a_directory.read_text() == ""
    proc = conclave("halt", "--valkey", "redis://127.0.0.1:1", "--create", "--reason", "r")
    assert proc.returncode == 2 and "--create goes with --halt-file" in proc.stderr


def test_halt_from_another_process_stops_a_running_deliberation(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    transcript = tmp_path / "run.json"
    with deliberating(
        "--latency-ms", "600000", "--halt-file", str(halt_file), "--json", str(transcript)
    ) as proc:
        halt_from_cli(halt_file, "stop the council")
        t_halt = time.monotonic()
        stdout, _ = proc.communicate(timeout=30)
        stopped_after = time.monotonic() - t_halt
    assert proc.returncode == 3
    assert re.search(r"status\s+HALTED: stop the council", stdout)
    assert re.search(r"failed\s+72 \(halted 72\)", stdout)
    assert re.search(r"pool after\s+0 active, 72/72 free", stdout)
    assert stopped_after < 5.0  # polls every 20 ms; the rest is interpreter exit
    doc = json.loads(transcript.read_text())
    assert doc["status"] == "halted" and doc["halt_reason"] == "stop the council"
    assert {o["kind"] for o in doc["outcomes"]} == {"halted"}
    # From the halt being written to the batch having stopped, by the two processes' own
    # (wall) clocks: the file is polled every 20 ms.
    raised = datetime.fromisoformat(json.loads(halt_file.read_text())["history"][-1]["at"])
    stopped = datetime.fromisoformat(doc["completed_at"])
    lag_ms = (stopped - raised).total_seconds() * 1000
    print(f"halt file -> batch stopped: {lag_ms:.1f} ms")
    assert lag_ms < 500


def test_ctrl_c_halts_cleanly_with_partial_summary(tmp_path: Path) -> None:
    transcript = tmp_path / "run.json"
    with deliberating("--latency-ms", "600000", "--json", str(transcript)) as proc:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert re.search(r"status\s+HALTED: operator interrupt \(SIGINT\)", stdout)
    assert re.search(r"pool after\s+0 active, 72/72 free", stdout)
    # the transcript is whole (written atomically) and no temp file is left behind
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    doc = json.loads(transcript.read_text())
    assert doc["status"] == "interrupted" and doc["counts"]["failed"] == 72


def test_progress_display_renders_in_a_terminal() -> None:
    child = pexpect.spawn(
        CONCLAVE[0],
        [*CONCLAVE[1:], "deliberate", "--latency-ms", "1500"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=30,
        dimensions=(24, 120),
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
    )
    try:
        child.expect("deliberating")
        child.expect("0/72 done · 0 failed · 72 in flight")  # redrawn while agents run
        child.expect("72/72 done · 0 failed · 0 in flight")
        child.expect("succeeded")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_openai_backend_against_loopback_server(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    roster = tmp_path / "council.toml"
    roster.write_text('[[agents]]\nagent_id = "alpha"\n[[agents]]\nagent_id = "beta"\n')
    llm_server.script("beta", 401)
    proc = conclave(
        "deliberate",
        "--backend",
        "openai",
        "--base-url",
        llm_server.base_url,
        "--model",
        "fake-model",
        "--roster",
        str(roster),
        "--show",
        "1",
    )
    assert proc.returncode == 1, proc.stderr
    assert re.search(r"succeeded\s+1\b", proc.stdout)
    assert "beta: error: agent 'beta'" in proc.stdout
    assert "alpha votes aye" in proc.stdout
    assert llm_server.attempts["alpha"] == 1


def test_openai_backend_unreachable_exits_2() -> None:
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"
    )
    assert proc.returncode == 2
    assert "cannot reach http://127.0.0.1:9/v1" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "base_url",
    [
        f"http://127.0.0.1:9/v1?api_key={SECRET}",
        f"http://127.0.0.1:9/v1#access_token={SECRET}",
        f"http://user:{SECRET}@127.0.0.1:9/v1",
        f"http://user:{SECRET}/x@127.0.0.1:9/v1",  # a '/' makes the parser see a port
    ],
)
def test_a_secret_in_the_base_url_is_refused_without_being_shown(
    tmp_path: Path, base_url: str
) -> None:
    roster = tmp_path / "roster.toml"
    roster.write_text(f'[[agents]]\nagent_id = "a"\nbase_url = "{base_url}"\n')
    flag = ["--base-url", base_url, "--model", "m"]
    in_roster = ["--roster", str(roster), "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    for args in (flag, in_roster):
        proc = conclave("deliberate", "--backend", "openai", *args, "--log-level", "debug")
        assert proc.returncode == 2 and "base_url" in proc.stderr, proc.stderr
        assert_never_shown(SECRET, [proc.stdout, proc.stderr])


def conclave_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``conclave *args`` in an interpreter where ``module`` cannot be imported, as in a
    wheel installed without the extra that brings it (``None`` in ``sys.modules``: both
    ``import`` and ``importlib.util.find_spec`` say it is not there)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from adapters.cli.commands import main; sys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


_OPENAI = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]


@pytest.mark.parametrize(
    ("module", "args", "hint"),
    [
        ("trio_asyncio", ["deliberate", *_OPENAI], "--backend openai needs trio_asyncio"),
        ("openai", ["deliberate", *_OPENAI], "--backend openai needs openai"),
        ("coredis", ["deliberate", "--valkey", "redis://127.0.0.1:1"], "--valkey needs coredis"),
        ("coredis", ["status", "--valkey", "redis://127.0.0.1:1"], "--valkey needs coredis"),
        ("prometheus_client", ["deliberate", "--metrics-port", "0"], "--metrics-port needs"),
    ],
)
def test_a_missing_extra_is_named_in_one_line_before_anything_runs(
    tmp_path: Path, module: str, args: list[str], hint: str
) -> None:
    """Exit 2 with the extra to install, no traceback, and before the halt is read:
    a halted system does not hide what is missing."""
    extra = {"trio_asyncio": "llm", "openai": "llm", "coredis": "valkey"}.get(module, "metrics")
    if args[0] == "deliberate":
        halted = tmp_path / "halt.json"
        halt_from_cli(halted, "maintenance")
        args = [*args, "--halt-file", str(halted)]
    proc = conclave_without(module, *args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"conclave: {hint}")
    assert proc.stderr.endswith(f": pip install 'conclave-kernel[{extra}]'\n")
    assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""


def test_a_broken_install_of_an_extra_is_named_too() -> None:
    """openai there, but not a library it needs (httpx2): the import fails where the
    backend is opened, with the same one line."""
    proc = conclave_without("httpx2", "deliberate", *_OPENAI, "--agents", "2")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "conclave: --backend openai needs httpx2: pip install 'conclave-kernel[llm]'\n"
    )


@pytest.mark.skipif(
    importlib.util.find_spec("crewai") is not None,
    reason="crewai is installed here: tests/adapters/llm/crewai/test_crewai_cli.py runs it",
)
def test_crewai_backend_without_crewai_exits_2_before_anything_runs(tmp_path: Path) -> None:
    """The main environment has no crewai (it has its own: .venv-crewai)."""
    out = tmp_path / "run.json"
    proc = conclave(
        "deliberate",
        "--backend",
        "crewai",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
        "--roster",
        "examples/archons-sample.json",
        "--json",
        str(out),
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("conclave: --backend crewai needs crewai")
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # refused before anything ran


def test_witness_db_and_verify(tmp_path: Path) -> None:
    db = tmp_path / "witness.db"
    proc = conclave("deliberate", "--latency-ms", "2", "--witness-db", str(db), "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = conclave("verify", str(db))
    assert proc.returncode == 0 and proc.stdout.startswith("ok: 72 records")
    run_sql(db, "UPDATE outputs SET content = 'forged' WHERE sequence = 9")
    proc = conclave("verify", str(db))
    assert proc.returncode == 1 and proc.stdout.startswith("BROKEN at sequence 9")
    proc = conclave("verify", str(tmp_path / "missing.db"))
    assert proc.returncode == 2 and "no such witness log" in proc.stderr


def test_metrics_port_serves_while_running() -> None:
    proc = conclave("deliberate", "--latency-ms", "2", "--metrics-port", "0", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"metrics at http://127\.0\.0\.1:\d+/metrics", proc.stderr)
    bad = conclave("deliberate", "--metrics-port", "99999")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_log_level_shows_structured_logs_without_content() -> None:
    proc = conclave(
        "deliberate",
        "--agents",
        "4",
        "--fail-rate",
        "0.5",
        "--seed",
        "1",
        "--latency-ms",
        "1",
        "--log-level",
        "info",
        "--quiet",
    )
    assert proc.returncode == 1
    assert proc.stdout.startswith("conclave: completed with failures: 2/4 succeeded")
    failed = [line for line in proc.stderr.splitlines() if "agent failed" in line]
    assert len(failed) == 2
    assert all("failure_kind=error" in line and "batch_id=" in line for line in failed)
    assert "batch finished" in proc.stderr
    assert "deliberated in" not in proc.stderr  # the stub's answers never reach the logs
