"""The CLI under hostile conditions (issue 9, items 7-9): huge councils, transcripts that
cannot be written, a busy or dead server, a halt already raised.  Subprocesses, as a
user runs them."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adapters.cli.commands import DEFAULT_AGENT_TIMEOUT_S, agent_timeout, build_parser
from tests.support import ROOT
from tests.support.cli import CONCLAVE, conclave, deliberating, halt_from_cli
from tests.support.fake_openai import FakeOpenAIServer

# ---------------------------------------------------------------- item 7: council size


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


# ---------------------------------------------------------------- item 8: the transcript


@pytest.mark.parametrize(
    "where",
    [
        "/proc/conclave-run.json",  # exists, is a directory, but nothing can be created in it
        "{tmp}/a-file/run.json",  # the "directory" is a regular file
        "{tmp}",  # a directory
    ],
)
def test_unwritable_transcript_is_refused_before_the_run(tmp_path: Path, where: str) -> None:
    (tmp_path / "a-file").write_text("")
    proc = conclave("deliberate", "--latency-ms", "1", "--json", where.format(tmp=tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.startswith("conclave: --json ")
    assert len(proc.stderr.splitlines()) == 1  # nothing ran: no "deliberating" line
    assert proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def _transcript_lost(stderr: str, path: Path) -> None:
    lines = [line for line in stderr.splitlines() if "transcript" in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith(f"conclave: transcript not written: --json {path}: ")
    assert "Traceback" not in stderr


def test_transcript_lost_after_a_completed_run_keeps_the_summary(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    transcript = out_dir / "run.json"
    # The agents take 3 s; the directory goes as soon as the batch has started.
    with deliberating("--latency-ms", "3000", "--json", str(transcript)) as proc:
        out_dir.rmdir()
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 4  # 0 (every agent succeeded) + 4 (transcript not written)
    assert re.search(r"status\s+completed", stdout)
    assert re.search(r"succeeded\s+72\b", stdout)
    _transcript_lost(stderr, transcript)


def test_transcript_lost_after_a_halt_keeps_the_summary(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    transcript = out_dir / "run.json"
    with deliberating(
        "--latency-ms", "600000", "--halt-file", str(halt_file), "--json", str(transcript)
    ) as proc:
        out_dir.rmdir()
        halt_from_cli(halt_file, "stop")
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 7  # 3 (halted) + 4 (transcript not written)
    assert re.search(r"status\s+HALTED: stop", stdout)
    assert re.search(r"pool after\s+0 active, 72/72 free", stdout)
    _transcript_lost(stderr, transcript)


def test_halted_before_start_still_writes_the_transcript(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    transcript = tmp_path / "run.json"
    halt_from_cli(halt_file, "audit")
    proc = conclave(
        "deliberate", "--halt-file", str(halt_file), "--json", str(transcript), "--topic", "T"
    )
    assert proc.returncode == 3
    assert "halted before starting: audit" in proc.stderr
    doc = json.loads(transcript.read_text())
    assert doc["schema"] == "conclave.transcript/1"
    assert doc["status"] == "halted" and doc["halt_reason"] == "audit"
    assert doc["outcomes"] == []
    assert doc["batch_id"] is None and doc["started_at"] is None and doc["total_ms"] is None
    assert doc["counts"] == {"total": 0, "succeeded": 0, "failed": 0, "by_kind": {}}
    assert doc["pool_after"] == {"active_count": 0, "available_count": 72, "max_concurrent": 72}
    assert doc["topic"]["topic_id"] == "cli-topic" and len(doc["topic"]["content_sha256"]) == 64
    assert doc["backend"] == "stub" and doc["model"] is None


# ---------------------------------------------------------------- item 9: busy or dead server


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
