"""``conclave deliberate`` with tail control: --deadline, --quorum, --hedge-after, and the
stub's heavy-tailed latency profile, run as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cli import conclave


def test_quorum_and_hedging_are_reported_in_the_summary(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    proc = conclave(
        "deliberate",
        "--latency-profile", "lognormal", "--latency-ms", "20", "--seed", "3",
        "--hedge-after", "0.05", "--quorum", "60", "--json", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr  # the 12 cancelled were not needed
    assert "succeeded   60" in proc.stdout
    assert "cancelled   12 not needed (quorum reached)" in proc.stdout
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
