"""The CLI as a user runs it: a subprocess, its output and its exit code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_openai import FakeOpenAIServer


def conclave(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "adapters.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_deliberate_72_agents_prints_summary() -> None:
    proc = conclave("deliberate", "--agents", "72", "--latency-ms", "20")
    assert proc.returncode == 0, proc.stderr
    assert "succeeded : 72" in proc.stdout
    assert "failed    : 0" in proc.stdout
    assert "ideal 20.0 ms" in proc.stdout
    assert "pool after: 0 active, 72/72 free" in proc.stdout


def test_oversize_batch_is_refused_with_fr10() -> None:
    proc = conclave("deliberate", "--agents", "73", "--latency-ms", "1")
    assert proc.returncode == 2
    assert "FR10" in proc.stderr and "Traceback" not in proc.stderr


def test_queue_mode_runs_oversize_batch() -> None:
    proc = conclave("deliberate", "--agents", "100", "--latency-ms", "1", "--overflow", "queue")
    assert proc.returncode == 0, proc.stderr
    assert "succeeded : 100" in proc.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["deliberate", "--agents", "zero"],
        ["deliberate", "--agents", "0"],
        ["deliberate", "--latency-ms", "-5"],
        ["deliberate", "--overflow", "drop"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_usage_exits_2_with_one_line(args: list[str]) -> None:
    proc = conclave(*args)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("conclave: ")


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
    )
    assert proc.returncode == 1, proc.stderr
    assert "succeeded : 1" in proc.stdout
    assert "beta: error: agent 'beta'" in proc.stdout
    assert llm_server.attempts["alpha"] == 1


def test_openai_backend_unreachable_or_incomplete_exits_2(tmp_path: Path) -> None:
    proc = conclave(
        "deliberate", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"
    )
    assert proc.returncode == 2
    assert "cannot reach http://127.0.0.1:9/v1" in proc.stderr and "Traceback" not in proc.stderr
    proc = conclave("deliberate", "--backend", "openai", "--model", "m")
    assert proc.returncode == 2 and "--base-url" in proc.stderr
    proc = conclave("deliberate", "--roster", str(tmp_path / "missing.toml"))
    assert proc.returncode == 2 and "roster file not found" in proc.stderr
