"""``conclave deliberate --backend crewai`` as a user runs it: a subprocess, real crewai,
the loopback server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer

ARCHONS = ROOT / "examples" / "archons-sample.json"


def conclave(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapters.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_an_archon_council_deliberates_with_crewai(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    llm_server.script("archon-imrith", 401)
    out = tmp_path / "run.json"
    proc = conclave(
        "deliberate",
        "--backend",
        "crewai",
        "--roster",
        str(ARCHONS),
        "--base-url",
        llm_server.base_url,
        "--model",
        "fake-model",
        "--topic",
        "Adopt the budget?",
        "--json",
        str(out),
        "--show",
        "1",
    )
    assert proc.returncode == 1, proc.stderr  # one archon failed
    assert re.search(r"succeeded\s+5\b", proc.stdout)
    assert "archon-imrith: error: agent 'archon-imrith' (CrewAI, fake-model at" in proc.stdout
    assert "archon-vessa votes aye" in proc.stdout  # --show 1: the first answer
    assert "Traceback" not in proc.stderr
    assert "Task Started" not in proc.stdout + proc.stderr  # CrewAI's panels stay off
    doc = json.loads(out.read_text())
    assert doc["backend"] == "crewai" and doc["model"] == "fake-model"
    assert len(doc["outcomes"]) == 6
    assert llm_server.headers[0][":path"].endswith("/models")  # the reachability probe
    chats = [b for b in llm_server.bodies if "messages" in b]
    assert len(chats) == 6
    # each archon's own system prompt first, then CrewAI's persona
    assert all(b["messages"][0]["content"].startswith("You are ") for b in chats)


def test_the_crewai_backend_refuses_an_unreachable_server(tmp_path: Path) -> None:
    proc = conclave(
        "deliberate",
        "--backend",
        "crewai",
        "--roster",
        str(ARCHONS),
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--model",
        "m",
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "conclave: cannot reach http://127.0.0.1:9/v1: connection refused"


@pytest.mark.parametrize(
    ("fault", "ending"),
    [
        (("trickle", 0.5), "timed out after 1 attempt(s)"),
        (("gzip_bomb", 2**30), "cap inflated (max_response_bytes); not retried"),
    ],
)
def test_a_hostile_server_fails_each_crewai_agent_within_the_timeout(
    llm_server: FakeOpenAIServer, tmp_path: Path, fault: object, ending: str
) -> None:
    llm_server.default = fault  # the probe too: it reads the same fault
    out = tmp_path / "run.json"
    t0 = time.monotonic()
    proc = conclave(
        "deliberate",
        "--backend",
        "crewai",
        "--roster",
        str(ARCHONS),
        "--base-url",
        llm_server.base_url,
        "--model",
        "fake-model",
        "--timeout",
        "3",  # the agent's bound and each request's: the request's ends it first
        "--quiet",
        "--json",
        str(out),
    )
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    outcomes = json.loads(out.read_text())["outcomes"]
    assert len(outcomes) == 6
    assert all(o["message"].endswith((ending, "exceeded its timeout of 3 s")) for o in outcomes)
    # The probe and the batch, 3 s at most each, plus crewai's import and set-up.
    assert elapsed < 6 + 20


def test_rpm_paces_a_crewai_council_and_the_summary_reports_what_it_cost(
    llm_server: FakeOpenAIServer,
) -> None:
    window_s = 1.0  # the loopback server's "minute", 60 times faster
    # Fewer than the council: a burst is refused.  (40: the pacing's 5 % headroom is two
    # requests, room for a loaded machine's jitter.)
    llm_server.limit_rate(40, 10**7, window_s)
    proc = conclave(
        "deliberate", "--backend", "crewai", "--agents", "50", "--base-url",
        llm_server.base_url, "--model", "fake-model", "--rpm", str(round(40 * 60 / window_s)),
        "--quiet",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "50/50 succeeded" in proc.stdout
    waited = re.search(
        r"rate limits: ([\d.]+) s waiting for budget \(all agents\), 0 x HTTP 429", proc.stdout
    )
    assert waited is not None, proc.stdout
    assert float(waited.group(1)) > 0.1  # the agents past the first window waited
    assert llm_server.rate_limited == 0
