"""deploy/prometheus/alerts.yml: valid for Prometheus, and every alert fires when it should
and stays quiet when it should not (promtool's unit tests beside it, alerts.test.yml, run
by the real promtool over synthetic series)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.tools import require_tool

ROOT = Path(__file__).resolve().parents[3]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
UNIT_TESTS = RULES.with_name("alerts.test.yml")


@pytest.fixture(scope="module")
def promtool() -> Path:
    return require_tool("promtool", "prometheus")


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=120, check=False
    )


def _alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), flags=re.M)


def test_promtool_accepts_the_rules(promtool: Path) -> None:
    done = _run(promtool, "check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_fires_and_stays_quiet_as_its_unit_tests_say(promtool: Path) -> None:
    done = _run(promtool, "test", "rules", UNIT_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_case_and_a_quiet_case() -> None:
    """alerts.test.yml expects each alert at least once (with its labels) and at least once
    not at all: a rule that never fires, or always does, fails one of them."""
    text = UNIT_TESTS.read_text()
    cases = re.findall(
        r"alertname: (\w+)\n\s+exp_alerts:( \[\])?", text
    )  # (name, "" when firing / " []" when quiet)
    firing = {name for name, quiet in cases if not quiet}
    quiet = {name for name, quiet in cases if quiet}
    alerts = _alerts()
    assert len(alerts) == 11, alerts
    assert sorted(firing) == sorted(alerts)
    assert sorted(quiet) == sorted(alerts)


def test_promtool_fails_a_rule_whose_threshold_is_off(promtool: Path, tmp_path: Path) -> None:
    """The unit tests bite: the same rules with a 29 s instead of a 30 s p95 target fail
    them (the quiet case at the border catches it)."""
    (tmp_path / "alerts.yml").write_text(RULES.read_text().replace("p95_5m > 30", "p95_5m > 29"))
    (tmp_path / "alerts.test.yml").write_text(UNIT_TESTS.read_text())
    done = _run(promtool, "test", "rules", tmp_path / "alerts.test.yml")
    assert done.returncode != 0
    assert "ConclaveBatchP95Above30s" in done.stdout + done.stderr
