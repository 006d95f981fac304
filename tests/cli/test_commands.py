"""The CLI as a user runs it: subprocesses, exit codes, signals, a pseudo-terminal."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pexpect
import pytest
import trio

import kernel
from adapters.cli.commands import DEFAULT_AGENT_TIMEOUT_S, agent_timeout, build_parser, main
from adapters.roster import MAX_ROSTER_BYTES
from tests.support import ROOT
from tests.support.cli import CONCLAVE, conclave, conclave_without, deliberating, halt_from_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.hostile_parts import HUGE
from tests.support.otlp_collector import Collector
from tests.support.pushgateway import hanging_gateway, pushgateway, scrape
from tests.support.url_secrets import SECRET, assert_never_shown
from tests.support.valkey_server import free_port
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


@pytest.mark.parametrize("topic", ["", "  \n"])
def test_an_empty_topic_is_refused_before_anything_runs(topic: str) -> None:
    # An unset shell variable (--topic "$TOPIC") would ask 72 paid LLM calls nothing.
    proc = conclave("deliberate", "--agents", "3", "--latency-ms", "1", "--topic", topic)
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr == "conclave: --topic is empty: the agents would be asked nothing\n"
    assert proc.stdout == ""


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


def test_without_base_url_the_openai_backend_calls_openai_base_url_with_openai_api_key(
    llm_server: FakeOpenAIServer,
) -> None:
    env = {**os.environ, "OPENAI_BASE_URL": llm_server.base_url, "OPENAI_API_KEY": SECRET}
    proc = conclave(
        "deliberate", "--backend", "openai", "--model", "m", "--agents", "3", "--quiet",
        "--log-level", "debug", env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "3/3 succeeded" in proc.stdout
    chats = [h for h in llm_server.headers if h[":path"].endswith("/chat/completions")]
    assert len(chats) == 3 and {h["authorization"] for h in chats} == {f"Bearer {SECRET}"}
    assert_never_shown(SECRET, [proc.stdout, proc.stderr])


def test_a_secret_in_openai_base_url_is_refused_without_being_shown() -> None:
    env = {**os.environ, "OPENAI_BASE_URL": f"http://user:{SECRET}@127.0.0.1:9/v1"}
    proc = conclave("deliberate", "--backend", "openai", "--model", "m", env=env)
    assert proc.returncode == 2 and "$OPENAI_BASE_URL" in proc.stderr, proc.stderr
    assert_never_shown(SECRET, [proc.stdout, proc.stderr])


def test_a_model_the_server_does_not_list_is_refused_before_anything_runs(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.models = ["fake-model"]
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", llm_server.base_url, "--model", "gpt-x"
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"conclave: model 'gpt-x' not found at {llm_server.base_url} (it lists: fake-model); "
        "nothing was run"
    ]
    assert not any(h[":path"].endswith("/chat/completions") for h in llm_server.headers)


def test_a_listing_of_hostile_names_is_refused_in_one_bounded_line_of_plain_text(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.models = ["\x1b]0;owned\x07\x1b[2J\nconclave: completed", "z" * 100_000]
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", llm_server.base_url, "--model", "gpt-x"
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.splitlines()
    assert line.startswith("conclave: model 'gpt-x' not found at ") and "nothing was run" in line
    assert "\x1b" not in line and "\x07" not in line and len(line) < 1000, line[:2000]


def test_a_wrong_model_past_the_check_is_said_once_for_72_agents(
    llm_server: FakeOpenAIServer,
) -> None:
    llm_server.models = ["fake-model"]
    args = ["--backend", "openai", "--base-url", llm_server.base_url, "--model", "gpt-x"]
    proc = conclave("deliberate", *args, "--no-model-check")
    assert proc.returncode == 1, proc.stderr
    line = f"72 agents: 404 model 'gpt-x' not found at {llm_server.base_url}"
    assert [s.strip() for s in proc.stdout.splitlines() if "!" in s] == [f"! {line}"]
    quiet = conclave("deliberate", *args, "--no-model-check", "--quiet")
    assert quiet.stdout.rstrip().endswith(f"; {line}"), quiet.stdout


def test_a_wrong_key_is_said_once_and_never_shown(llm_server: FakeOpenAIServer) -> None:
    llm_server.api_key = "sk-the-right-one"
    env = {**os.environ, "OPENAI_API_KEY": SECRET}
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", llm_server.base_url, "--model", "m",
        "--agents", "5", "--log-level", "debug", env=env,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert [s.strip() for s in proc.stdout.splitlines() if "!" in s] == [
        f"! 5 agents: 401 authentication failed at {llm_server.base_url} (check the API key)"
    ]
    # The listing answered 401 too: a note, and the run went on.
    assert "did not list the models (HTTP 401)" in proc.stderr
    assert_never_shown(SECRET, [proc.stdout, proc.stderr])


def test_no_model_check_is_refused_for_another_backend() -> None:
    proc = conclave("deliberate", "--no-model-check")
    assert proc.returncode == 2
    assert "--no-model-check is the openai backend's" in proc.stderr


def test_the_openai_backend_runs_on_the_aiohttp_transport(llm_server: FakeOpenAIServer) -> None:
    proc = conclave(
        *_openai(llm_server.base_url, "--agents", "4", "--transport", "aiohttp", "--quiet")
    )
    assert proc.returncode == 0, proc.stderr
    assert "4/4 succeeded" in proc.stdout
    stub = conclave("deliberate", "--transport", "aiohttp")
    assert stub.returncode == 2 and "--transport is the openai backend's" in stub.stderr


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


_OPENAI = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"]


@pytest.mark.parametrize(
    ("module", "args", "hint"),
    [
        ("trio_asyncio", ["deliberate", *_OPENAI], "--backend openai needs trio_asyncio"),
        ("openai", ["deliberate", *_OPENAI], "--backend openai needs openai"),
        ("coredis", ["deliberate", "--valkey", "redis://127.0.0.1:1"], "--valkey needs coredis"),
        ("coredis", ["status", "--valkey", "redis://127.0.0.1:1"], "--valkey needs coredis"),
        ("prometheus_client", ["deliberate", "--metrics-port", "0"], "--metrics-port needs"),
        ("opentelemetry.sdk", ["deliberate", "--otel"], "--otel needs opentelemetry.sdk"),
    ],
)
def test_a_missing_extra_is_named_in_one_line_before_anything_runs(
    tmp_path: Path, module: str, args: list[str], hint: str
) -> None:
    """Exit 2 with the extra to install, no traceback, and before the halt is read:
    a halted system does not hide what is missing."""
    extras = {
        "trio_asyncio": "llm",
        "openai": "llm",
        "coredis": "valkey",
        "opentelemetry.sdk": "otel",
    }
    extra = extras.get(module, "metrics")
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
    head = re.fullmatch(
        r"witness log: 72 records, head ([0-9a-f]{64})\n", proc.stdout.split("\n", 1)[1]
    )
    assert head is not None, proc.stdout  # the receipt an operator keeps
    proc = conclave("verify", str(db), "--expected-head", head[1])
    assert proc.returncode == 0 and proc.stdout == f"ok: 72 records, chain intact, head {head[1]}\n"
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


@pytest.mark.slow
def test_otel_exports_the_runs_traces_to_the_collector_the_environment_names() -> None:
    collector = Collector()
    env = {**os.environ, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": collector.endpoint}
    try:
        proc = conclave(
            "deliberate", "--latency-ms", "2", "--agents", "3", "--otel", "--quiet", env=env
        )
    finally:
        collector.close()
    assert proc.returncode == 0, proc.stderr
    names = sorted(s.name for s in collector.spans())
    assert names == ["chat stub", "chat stub", "chat stub", "conclave.deliberation"]


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


def test_the_cli_refuses_such_a_roster_in_one_line(tmp_path: Path) -> None:
    """Guards against: a traceback (``OverflowError``), exit 1."""
    roster = tmp_path / "big.json"
    roster.write_text(json.dumps({"agents": [{"agent_id": "a", "timeout_s": HUGE}]}))
    proc = conclave("deliberate", "--roster", str(roster), "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert "field 'timeout_s'" in proc.stderr and proc.stdout == ""


def test_a_quorum_larger_than_the_council_is_refused_before_anything_is_opened(
    tmp_path: Path,
) -> None:
    """Guards against: refused by the kernel only after the run had started: "deliberating with 5
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


def test_ctrl_c_while_a_busy_server_is_probed_stops_at_once(
    llm_server: FakeOpenAIServer,
) -> None:
    """Guards against: the first Ctrl-C was only a halt for the batch to come, so the CLI sat out
    the reachability probe (up to --timeout, 60 s by default: measured 20.4 s with --timeout 20),
    said it was "deliberating", and only then stopped."""
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


def test_the_cli_reports_such_answers_instead_of_crashing(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    """Guards against: a ``UnicodeEncodeError`` traceback after the run (exit 1): no summary, no
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


# -------------------------------------- council size, a busy or dead server, a halt already raised


def test_absurd_agent_count_is_refused_at_once_with_fr10() -> None:
    t0 = time.monotonic()
    proc = conclave("deliberate", "--agents", "99999999999999999999", timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "conclave: FR10: agent pool exhausted: 0 active + 99999999999999999999 requested > 72\n"
    )
    assert proc.stdout == ""
    assert elapsed < 5.0  # interpreter start only; before: never returned


def test_a_million_agents_is_refused_before_anything_is_built() -> None:
    t0 = time.monotonic()
    proc = conclave("deliberate", "--agents", "1000000", timeout=30)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2
    assert "FR10: agent pool exhausted: 0 active + 1000000 requested > 72" in proc.stderr
    assert elapsed < 5.0  # before: ~10 s and 555 MB building the council first


@pytest.mark.parametrize("extra", [["--overflow", "queue"], ["--sequential"]])
def test_unbounded_modes_cap_the_council(extra: list[str]) -> None:
    proc = conclave("deliberate", "--agents", "99999999999999999999", *extra, timeout=30)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        "conclave: --agents 99999999999999999999: at most 100000 agents in one run\n"
    )


def test_the_cap_holds_even_when_the_capacity_is_larger() -> None:
    proc = conclave("deliberate", "--agents", "200000", "--capacity", "300000", timeout=30)
    assert proc.returncode == 2
    assert "at most 100000 agents in one run" in proc.stderr


def test_oversize_roster_is_refused_before_the_server_is_probed(tmp_path: Path) -> None:
    roster = tmp_path / "council.json"
    agents = [{"agent_id": f"a{i}"} for i in range(5)]
    roster.write_text(json.dumps({"agents": agents}))
    proc = conclave(
        "deliberate",
        "--roster",
        str(roster),
        "--capacity",
        "4",
        "--backend",
        "openai",
        "--base-url",
        "http://127.0.0.1:9/v1",  # nothing listens: a probe would say "cannot reach"
        "--model",
        "m",
    )
    assert proc.returncode == 2
    assert proc.stderr == "conclave: FR10: agent pool exhausted: 0 active + 5 requested > 4\n"


def test_a_halt_is_still_checked_before_the_council_size(tmp_path: Path) -> None:
    """The kernel's order: a halted system refuses everything, even an oversize batch."""
    halt_file = tmp_path / "halt.json"
    halt_from_cli(halt_file, "r")
    proc = conclave("deliberate", "--agents", "73", "--halt-file", str(halt_file))
    assert proc.returncode == 3 and "halted before starting: r" in proc.stderr


# ---------------------------------------------------------------- a busy or dead server


def _openai(base_url: str, *args: str) -> list[str]:
    return ["deliberate", "--backend", "openai", "--base-url", base_url, "--model", "m", *args]


@pytest.fixture
def two_agents(tmp_path: Path) -> Path:
    roster = tmp_path / "council.toml"
    roster.write_text('[[agents]]\nagent_id = "alpha"\n[[agents]]\nagent_id = "beta"\n')
    return roster


def test_busy_server_is_not_unreachable(llm_server: FakeOpenAIServer, two_agents: Path) -> None:
    """llama.cpp answers /v1/models only between generations: silence there is "busy"."""
    llm_server.models_fault = "hang"
    t0 = time.monotonic()
    proc = conclave(*_openai(llm_server.base_url, "--roster", str(two_agents), "--timeout", "1"))
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"succeeded\s+2\b", proc.stdout)
    busy = [line for line in proc.stderr.splitlines() if "busy" in line]
    assert busy == [
        f"conclave: warning: {llm_server.base_url} did not answer within 1 s; "
        "assuming it is busy and going on"
    ]
    assert llm_server.attempts["alpha"] == llm_server.attempts["beta"] == 1
    # The probe waited --timeout (1 s), not a fixed 5 s.
    assert elapsed < 4.5


@pytest.mark.slow
def test_probe_waits_as_long_as_timeout_allows(
    llm_server: FakeOpenAIServer, two_agents: Path
) -> None:
    """A /models answer after 5.5 s is an answer when --timeout allows 30 s: no warning."""
    llm_server.models_fault = ("latency", 5.5)
    proc = conclave(
        *_openai(llm_server.base_url, "--roster", str(two_agents), "--timeout", "30", "--quiet")
    )
    assert proc.returncode == 0, proc.stderr
    assert "busy" not in proc.stderr
    assert llm_server.answered == 3  # the probe and both agents


def test_refused_connection_is_unreachable() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = conclave(*_openai(f"http://127.0.0.1:{port}/v1"))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"conclave: cannot reach http://127.0.0.1:{port}/v1")
    assert len(proc.stderr.splitlines()) == 1


@pytest.fixture
def full_backlog() -> Iterator[int]:
    """A listening port whose accept queue is full: new connections are never set up."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        filler = socket.create_connection(("127.0.0.1", port))
        try:
            yield port
        finally:
            filler.close()


def test_connection_never_set_up_is_unreachable(full_backlog: int) -> None:
    """A timeout while connecting is "no route", not "busy": a busy server still connects."""
    url = f"http://127.0.0.1:{full_backlog}/v1"
    proc = conclave(*_openai(url, "--timeout", "1"))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"conclave: cannot reach {url}")


def test_halt_is_checked_before_reachability(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    halt_from_cli(halt_file, "r")
    proc = conclave(*_openai("http://127.0.0.1:9/v1", "--halt-file", str(halt_file)))
    assert proc.returncode == 3, proc.stderr
    assert "halted before starting: r" in proc.stderr
    assert "cannot reach" not in proc.stderr


# ---------------------------------------------------------------- a hostile server


@pytest.mark.parametrize(
    ("fault", "endings"),
    [
        # The request's deadline and the agent's are both --timeout: either ends it.
        (("trickle", 0.5), ("agent exceeded its timeout of 2 s", "timed out after 1 attempt(s)")),
        (
            ("gzip_bomb", 2**30),
            ("over the 8388608-byte cap inflated (max_response_bytes); not retried",),
        ),
    ],
)
def test_a_hostile_server_fails_each_agent_within_the_timeout(
    llm_server: FakeOpenAIServer,
    two_agents: Path,
    tmp_path: Path,
    fault: object,
    endings: tuple[str, ...],
) -> None:
    llm_server.default = fault
    llm_server.models_fault = fault  # the probe too
    transcript = tmp_path / "run.json"
    t0 = time.monotonic()
    proc = conclave(
        *_openai(llm_server.base_url, "--roster", str(two_agents), "--timeout", "2"),
        "--quiet",
        "--json",
        str(transcript),
        timeout=60,
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert "0/2 succeeded, 2 failed" in proc.stdout, proc.stdout
    # The probe (2 s at most) and the batch (2 s at most), plus interpreter start-up.
    assert elapsed < 4 + 8
    doc = json.loads(transcript.read_text())
    assert all(o["message"].endswith(endings) for o in doc["outcomes"]), doc["outcomes"]


def test_a_halt_written_while_the_probe_hangs_stops_it_at_once(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    llm_server.models_fault = ("trickle", 0.5)  # the probe never completes (--timeout 600)
    halt_file = tmp_path / "halt.json"
    with subprocess.Popen(
        [
            *CONCLAVE,
            *_openai(llm_server.base_url, "--timeout", "600", "--halt-file", str(halt_file)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            assert llm_server.wait_for(lambda s: s.requests_total >= 1, 30)  # probing
            halt_from_cli(halt_file, "stop the probe")
            t_halt = time.monotonic()
            _, stderr = proc.communicate(timeout=30)
            stopped_after = time.monotonic() - t_halt
        finally:
            proc.kill()
    assert proc.returncode == 3, stderr
    assert "halted before starting: stop the probe" in stderr
    assert stopped_after < 5.0  # polled every 50 ms; the rest is interpreter exit
    assert llm_server.wait_for(lambda s: s.disconnects >= 1)  # the probe's request closed


def test_every_agent_has_a_finite_timeout_by_default() -> None:
    parser = build_parser()
    default = agent_timeout(parser.parse_args(["deliberate", "--backend", "openai"]))
    assert default == DEFAULT_AGENT_TIMEOUT_S == 300.0
    # Every attempt of the orchestrator's defaults fits: 4 x 60 s, 3 backoffs of <= 8 s.
    assert default > 4 * 60 + 3 * 8
    assert agent_timeout(parser.parse_args(["deliberate", "--timeout", "7.5"])) == 7.5


# ----------------------------------------------- tail control: --deadline, --quorum, --hedge-after


def test_quorum_and_hedging_are_reported_in_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    proc = conclave(
        "deliberate",
        "--latency-profile", "lognormal", "--latency-ms", "20", "--seed", "3",
        "--hedge-after", "0.05", "--quorum", "60", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # the 12 cancelled were not needed
    assert "succeeded   60" in proc.stdout
    assert "cancelled   12 after quorum of 60 (not needed)" in proc.stdout
    assert "agents got a duplicate call" in proc.stdout
    outcomes = json.loads(out.read_text())["outcomes"]
    assert sum(o.get("kind") == "cancelled" for o in outcomes) == 12


def test_deadline_turns_stragglers_into_timeouts() -> None:
    proc = conclave(
        "deliberate", "--latency-ms", "500", "--jitter-ms", "0", "--agents", "5",
        "--deadline", "0.1", "--quiet",
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    assert "0/5 succeeded, 5 failed (timeout 5)" in proc.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sequential", "--quorum", "2"], "--sequential and --quorum do not mix"),
        (["--sequential", "--hedge-after", "1"], "--sequential and --hedge-after do not mix"),
        (["--quorum", "100"], "quorum must be between 1 and the batch size (72), got 100"),
        (["--hedge-after", "soon"], "--hedge-after"),
        (["--deadline", "0"], "--deadline"),
        (["--latency-profile", "pareto"], "--latency-profile"),
        (["--hedge-budget", "2"], "--hedge-budget"),
    ],
)
def test_bad_tail_flags_are_one_line_and_exit_2(flags: list[str], message: str) -> None:
    proc = conclave("deliberate", "--quiet", *flags)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def _pushed_run(stderr: str) -> str:
    found = re.search(r"metrics pushed to \S+ \(run ([0-9a-f]{32})\)", stderr)
    assert found, stderr
    return found.group(1)


def _series(text: str, name: str, run: str) -> dict[str, float]:
    """``name``'s samples in the gateway's text for ``run``: labels text -> value."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'run="{run}"' in line:
            labels, value = line.rsplit(" ", 1)
            found[labels] = float(value)
    return found


def test_metrics_push_puts_the_runs_series_on_the_gateway() -> None:
    with pushgateway() as url:
        proc = conclave(
            "deliberate",
            *("--agents", "6", "--fail-rate", "0.5", "--seed", "3", "--latency-ms", "1"),
            *("--quiet", "--metrics-push", url),
        )
        assert proc.returncode == 1, proc.stderr  # the failures' code, as without a push
        run = _pushed_run(proc.stderr)
        text = scrape(url)
    (labels,) = _series(text, "conclave_batches_total", run)
    assert 'job="conclave"' in labels and f'instance="{socket.gethostname()}"' in labels
    assert _series(text, "conclave_batches_total", run)[labels] == 1
    failures = _series(text, "conclave_agent_failures_total", run)
    assert failures[next(k for k in failures if 'kind="error"' in k)] == 3
    assert sum(_series(text, "conclave_batch_duration_seconds_count", run).values()) == 1


def test_a_halted_run_still_pushes_its_metrics(tmp_path: Path) -> None:
    """The push comes after a batch a halt cancelled: it must not be cancelled with it."""
    halt_file = tmp_path / "halt.json"
    with pushgateway() as url:
        with deliberating(
            *("--latency-ms", "600000", "--halt-file", str(halt_file)),
            *("--metrics-push", url),
        ) as proc:
            halt_from_cli(halt_file, "stop the council")
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 3, stderr
        text = scrape(url)
    run = _pushed_run(stderr)
    assert list(_series(text, "conclave_halted_batches_total", run).values()) == [1]


@pytest.mark.parametrize("gateway", ["down", "hanging"])
def test_a_gateway_down_or_hanging_is_a_warning_and_the_run_keeps_its_exit_code(
    gateway: str,
) -> None:
    with contextlib.ExitStack() as stack:
        if gateway == "down":
            url = f"http://127.0.0.1:{free_port()}"
        else:
            url = stack.enter_context(hanging_gateway())
        proc = conclave(
            *("deliberate", "--agents", "4", "--latency-ms", "1", "--quiet"),
            *("--metrics-push", url, "--metrics-push-timeout", "0.5"),
            timeout=30,
        )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("conclave: completed: 4/4 succeeded")
    (line,) = [x for x in proc.stderr.splitlines() if "metrics" in x]
    assert line.startswith(f"conclave: warning: metrics not pushed to {url}: ")
    if gateway == "hanging":
        assert line.endswith("no answer within 0.5 s")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "url", ["ftp://gw:9091", "gw:9091", "http://user:hunter2@gw:9091", "http://gw/?a=1"]
)
def test_a_bad_metrics_push_url_is_a_usage_error_before_anything_runs(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["deliberate", "--agents", "2", "--latency-ms", "1", "--metrics-push", url])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("conclave: argument --metrics-push: ")
    assert "deliberating" not in err and out == ""
    assert "hunter2" not in err


def test_log_format_json_writes_parseable_lines_without_content_prompts_or_keys(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    roster = tmp_path / "council.toml"
    roster.write_text(
        '[defaults]\nsystem_prompt = "PROMPT-SENTINEL-7"\n'
        '[[agents]]\nagent_id = "alpha"\n[[agents]]\nagent_id = "beta"\n'
    )
    llm_server.script("beta", 401)
    proc = conclave(
        *("deliberate", "--backend", "openai", "--base-url", llm_server.base_url),
        *("--model", "fake-model", "--roster", str(roster), "--show", "1"),
        *("--topic", "TOPIC-SENTINEL-9", "--log-format", "json", "--log-level", "debug"),
        env={**os.environ, "OPENAI_API_KEY": SECRET},
    )
    assert proc.returncode == 1, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if not x.startswith("conclave: ")]
    docs = [json.loads(x) for x in lines]  # every log line is one JSON object
    assert docs and all({"time", "level", "logger", "message"} <= d.keys() for d in docs)
    assert all(d["logger"].split(".")[0] in ("kernel", "adapters") for d in docs)
    (failed,) = [d for d in docs if d["message"] == "agent failed"]
    assert failed["agent_id"] == "beta" and failed["failure_kind"] == "error"
    assert any(d["message"] == "batch finished" and d["batch_size"] == 2 for d in docs)
    assert "alpha votes aye" in proc.stdout  # the answer exists, and is shown only there
    for sentinel in ("PROMPT-SENTINEL-7", "TOPIC-SENTINEL-9", "votes aye"):
        assert sentinel not in proc.stderr
    assert_never_shown(SECRET, [proc.stderr])


def test_log_format_json_alone_logs_at_info_and_text_stays_the_default() -> None:
    args = ("deliberate", "--agents", "2", "--latency-ms", "1", "--quiet")
    as_json = conclave(*args, "--log-format", "json")
    (line,) = [x for x in as_json.stderr.splitlines() if x.startswith("{")]
    assert json.loads(line)["message"] == "batch finished"
    as_text = conclave(*args, "--log-level", "info")
    assert re.search(r" INFO kernel\.service: batch finished .*batch_size=2", as_text.stderr)
    assert conclave(*args).stderr == ""
    assert conclave(*args, "--log-format", "xml").returncode == 2


def test_openai_backend_summary_shows_the_servers_token_usage_at_the_rosters_prices(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    roster = tmp_path / "council.toml"
    roster.write_text(
        '[[agents]]\nagent_id = "alpha"\n[[agents]]\nagent_id = "beta"\n'
        "[prices.fake-model]\nprompt = 1000\ncompletion = 2000\n"
    )
    transcript = tmp_path / "run.json"
    proc = conclave(
        *("deliberate", "--backend", "openai", "--base-url", llm_server.base_url),
        *("--model", "fake-model", "--roster", str(roster), "--json", str(transcript)),
    )
    assert proc.returncode == 0, proc.stderr
    # The loopback server reports 11 prompt + 5 completion tokens an answer:
    # 22 x 1000 / 1e6 + 10 x 2000 / 1e6 = $0.042.
    assert re.search(r"tokens\s+22 prompt \+ 10 completion tokens, \$0\.0420\b", proc.stdout)
    usage = json.loads(transcript.read_text())["usage"]
    assert usage["per_agent"]["beta"] == {
        "model": "fake-model",
        "prompt_tokens": 11,
        "completion_tokens": 5,
        "cost_usd": pytest.approx(0.021),
    }
    assert usage["cost_usd"] == pytest.approx(0.042) and usage["estimated_agents"] == 0


@pytest.mark.parametrize(
    ("flags", "problem"),
    [
        (["--price-prompt", "-1", "--price-completion", "1"], "argument --price-prompt: must be"),
        (["--price-prompt", "nan", "--price-completion", "1"], "argument --price-prompt: must be"),
        (["--price-prompt", "1", "--price-completion", "abc"], "--price-completion: not a number"),
        (["--price-prompt", "1"], "--price-prompt and --price-completion go together"),
        (["--price-prompt", "1e308", "--price-completion", "1"], "prompt_per_1m must be <= 1e"),
        (
            ["--prices", "{tmp}/prices.json"],
            "--prices {tmp}/prices.json: model 'm': completion_per_1m must be >= 0",
        ),
        (["--prices", "{tmp}/none.json"], "--prices {tmp}/none.json: No such file"),
        (["--roster", "{tmp}/council.json"], "prices: model 'm': completion_per_1m must be"),
    ],
)
def test_a_bad_price_is_a_usage_error_before_anything_runs(
    tmp_path: Path, flags: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {"m": {"prompt": 1, "completion": -3}}
    (tmp_path / "prices.json").write_text(json.dumps({"prices": bad}))
    roster = {"agents": [{"agent_id": "a"}], "prices": bad}
    (tmp_path / "council.json").write_text(json.dumps(roster))
    witness = tmp_path / "w.db"
    code = main(
        ["deliberate", "--agents", "2", "--latency-ms", "1", "--witness-db", str(witness)]
        + [f.format(tmp=tmp_path) for f in flags]
    )
    out, err = capsys.readouterr()
    assert code == 2
    (line,) = err.splitlines()  # no "deliberating" line: nothing ran
    assert problem.format(tmp=tmp_path) in line, line
    assert out == "" and not witness.exists()


# ---------------------------------------------------------------- as an operator meets it


def test_version_names_the_release_the_package_metadata_names(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"conclave {kernel.__version__} (trio {trio.__version__}, Python ")
    assert kernel.__version__ == importlib.metadata.version("conclave-kernel")


@pytest.mark.parametrize(
    "args", [["deliberate", "--agent", "3"], ["deliberate", "--tim", "5"], ["verify", "--exp", "x"]]
)
def test_an_abbreviated_flag_is_refused_not_guessed(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("conclave: unrecognized arguments: ")


def test_json_dash_writes_the_transcript_to_stdout_and_the_summary_to_stderr(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["deliberate", "--agents", "3", "--latency-ms", "1", "--json", "-"]) == 0
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # stdout is the transcript and nothing else
    assert doc["status"] == "completed" and len(doc["outcomes"]) == 3
    assert "succeeded" in captured.err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--latency-ms", "5", "--backend", "openai"],
            "--latency-ms does nothing with --backend openai",
        ),
        (["--seed", "1", "--backend", "crewai"], "--seed does nothing with --backend crewai"),
        (["--model", "m"], "--model does nothing with --backend stub"),
        (["--base-url=http://127.0.0.1:9/v1"], "--base-url does nothing with --backend stub"),
        (["--max-tokens", "9"], "--max-tokens does nothing with --backend stub"),
        (
            ["--latency-profile", "lognormal", "--jitter-ms", "5"],
            "--jitter-ms does nothing with --latency-profile lognormal",
        ),
        (["--hedge-budget", "0.5"], "--hedge-budget does nothing without --hedge-after"),
        (["--include-content"], "--include-content does nothing without --json"),
        (["--quiet", "--show", "3"], "--show does nothing with --quiet"),
        (["--create"], "--create does nothing without --halt-file"),
    ],
)
def test_a_flag_that_would_do_nothing_is_refused_before_anything_runs(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    openai = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m"]
    extra = openai if {"openai", "crewai"} & set(args) else []
    assert main(["deliberate", "--agents", "2", *args, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing ran, no summary
    assert captured.err.startswith(f"conclave: {message}")
    assert len(captured.err.splitlines()) == 1


def test_a_quorum_run_lists_no_failures_for_the_agents_it_did_not_need(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["deliberate", "--agents", "10", "--latency-ms", "5", "--jitter-ms", "40"]
    assert main([*args, "--seed", "3", "--quorum", "4"]) == 0
    out = capsys.readouterr().out
    assert "cancelled   6 after quorum of 4 (not needed)" in out
    assert re.search(r"failed\s+0", out)
    assert "!" not in out  # no failure lines for agents that were not needed
    assert main([*args, "--seed", "3", "--quorum", "4", "--quiet"]) == 0
    assert "4/10 succeeded, 6 cancelled after quorum, 0 failed" in capsys.readouterr().out


def test_a_terminal_sees_what_the_run_waits_on_before_its_batch(
    llm_server: FakeOpenAIServer,
) -> None:
    child = pexpect.spawn(
        CONCLAVE[0],
        [*CONCLAVE[1:], *_openai(llm_server.base_url), "--agents", "2"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=30,
        dimensions=(24, 160),
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "160"},
    )
    try:
        child.expect(f"conclave: probing {re.escape(llm_server.base_url)} \\.\\.\\.")
        child.expect("deliberating with 2 agents")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_hedge_after_auto_learns_answer_times_across_runs_then_hedges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    args = ["deliberate", "--agents", "30", "--latency-ms", "20", "--jitter-ms", "30"]
    args += ["--seed", "1", "--hedge-after", "auto", "--quiet"]
    assert main(args) == 0
    first = capsys.readouterr()
    assert "0 of the 20 earlier answers it needs are remembered" in first.err
    assert ", 0 hedged," in first.out
    assert (tmp_path / "conclave" / "latency-history.json").is_file()
    assert main(args) == 0
    second = capsys.readouterr()
    assert "hedging after " in second.err and "the p95 of 30 earlier answers" in second.err


def test_hedge_after_auto_with_a_queue_is_refused_with_the_reason(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["deliberate", "--hedge-after", "auto", "--overflow", "queue"]) == 2
    assert "with --overflow queue give seconds" in capsys.readouterr().err


def test_without_the_cli_extra_the_command_runs_with_plain_lines() -> None:
    proc = conclave_without("rich", "deliberate", "--agents", "3", "--latency-ms", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("conclave: completed: 3/3 succeeded, 0 failed")
    assert "pip install 'conclave-kernel[cli]'" in proc.stderr


def test_a_failed_push_is_a_json_log_line_too_with_log_format_json() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = conclave(
        *("deliberate", "--agents", "2", "--latency-ms", "1", "--quiet"),
        *("--metrics-push", url, "--metrics-push-timeout", "2", "--log-format", "json"),
    )
    assert proc.returncode == 0, proc.stderr
    docs = [json.loads(x) for x in proc.stderr.splitlines() if x.startswith("{")]
    (pushed,) = [d for d in docs if d["logger"] == "adapters.pushgateway"]
    assert pushed["level"] == "WARNING" and pushed["message"] == "metrics not pushed"
    assert pushed["gateway"] == url and pushed["job"] == "conclave"
    assert pushed["group"].startswith("instance=") and ",run=" in pushed["group"]
    assert f"conclave: warning: metrics not pushed to {url}: " in proc.stderr
