"""``conclave load``: N batches on deliberate's code path, judged against the targets."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pexpect
import pytest

from adapters.cli.commands import main
from adapters.cli.load import TARGETS, LoadReport, render
from tests.support import ROOT
from tests.support.cli import CONCLAVE, conclave, conclave_without, halt_from_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.valkey_server import ValkeyServer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(
    batch_s: list[float], *, failures: int = 0, ratios: tuple[float, ...] = (0.5,)
) -> LoadReport:
    return LoadReport(
        backend="stub",
        agents_per_batch=10,
        batch_s=tuple(batch_s),
        batch_start_s=tuple(float(i) for i in range(len(batch_s))),
        agents=10 * len(batch_s),
        failures=failures,
        utilisation=tuple((float(i), r) for i, r in enumerate(ratios)),
    )


def _verdicts(report: LoadReport) -> dict[str, bool]:
    return {t.metric: ok for t, _, ok in report.verdicts()}


def test_each_target_passes_below_its_limit_and_fails_at_it() -> None:
    # 100 batches: p95 is the 95th smallest, p99 the 99th (nearest rank).
    under = _report([1.0] * 94 + [29.9] + [59.9] * 5, failures=49, ratios=(0.89, 0.89))
    assert _verdicts(under) == dict.fromkeys(_verdicts(under), True) and under.passed
    at = _report([1.0] * 94 + [30.0] * 4 + [60.0] * 2, failures=50, ratios=(0.9, 0.9))
    assert _verdicts(at) == dict.fromkeys(_verdicts(at), False) and not at.passed
    assert [t.metric for t in TARGETS] == list(_verdicts(at))


def test_a_run_without_batches_misses_every_target() -> None:
    empty = _report([], ratios=())
    assert not any(_verdicts(empty).values())
    assert math.isnan(empty.values()["p95_batch_s"])
    assert empty.as_dict()["p95_batch_s"] is None
    assert "n/a" in render(empty)


def test_load_runs_the_batches_and_reports_each_target_as_json() -> None:
    proc = conclave(
        *("load", "--batches", "3", "--agents", "8", "--latency-ms", "1", "--json", "-"),
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["batches"] == 3 and doc["agents"] == 24 and doc["failures"] == 0
    assert len(doc["batch_s"]) == 3 and all(0 < s < 5 for s in doc["batch_s"])
    assert doc["p50_batch_s"] <= doc["p95_batch_s"] <= doc["p99_batch_s"] == doc["max_batch_s"]
    assert [t["metric"] for t in doc["targets"]] == [t.metric for t in TARGETS]
    assert all(t["passed"] for t in doc["targets"]) and doc["passed"]
    # 8 agents in a 72 pool: the peak is 8/72 while a batch runs.
    assert doc["pool_utilisation_peak"] == pytest.approx(8 / 72)


def test_a_missed_target_is_a_fail_line_and_exit_1() -> None:
    proc = conclave(
        *("load", "--batches", "2", "--agents", "10", "--fail-rate", "0.1", "--latency-ms", "1"),
    )
    assert proc.returncode == 1, proc.stderr
    assert "FAIL  agent failure rate < 5 %" in proc.stdout and "10.0 %" in proc.stdout
    assert "PASS  p95 batch time < 30 s" in proc.stdout
    assert "agents: 20, failed 2" in proc.stdout


def test_load_writes_the_json_report_and_the_png(tmp_path: Path) -> None:
    report, png = tmp_path / "load.json", tmp_path / "load.png"
    proc = conclave(
        *("load", "--batches", "4", "--agents", "5", "--latency-ms", "5"),
        *(
            "--latency-profile",
            "lognormal",
            "--seed",
            "7",
            "--json",
            str(report),
            "--png",
            str(png),
        ),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(
        "conclave load: 4 batches x 5 agents (stub backend, lognormal latency, median 5 ms)"
    )
    assert json.loads(report.read_text())["batches"] == 4
    assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 10_000


def test_load_calls_the_openai_backend_as_deliberate_does(
    llm_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    roster = tmp_path / "council.toml"
    roster.write_text('[[agents]]\nagent_id = "alpha"\n[[agents]]\nagent_id = "beta"\n')
    proc = conclave(
        *("load", "--batches", "3", "--backend", "openai", "--base-url", llm_server.base_url),
        *("--model", "fake-model", "--roster", str(roster), "--json", "-"),
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["agents"] == 6
    assert llm_server.attempts["alpha"] == 3 and llm_server.attempts["beta"] == 3


@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["--batches", "0"], "argument --batches: must be 1-100000"),
        (["--png", "{tmp}/missing/x.png"], "--png {tmp}/missing/x.png: directory"),
        (["--json", "{tmp}"], "--json {tmp}: is a directory"),
        (["--out", "{tmp}/missing"], "--out {tmp}/missing/load.json: directory"),
        (["--backend", "openai"], "--backend openai needs --model"),
        (["--agents", "73"], "FR10"),
    ],
)
def test_bad_usage_is_refused_before_any_batch_runs(
    tmp_path: Path, args: list[str], problem: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["load", *(a.format(tmp=tmp_path) for a in args)])
    out, err = capsys.readouterr()
    assert code == 2
    (line,) = err.splitlines()  # no "load:" line: no batch ran
    assert problem.format(tmp=tmp_path) in line and out == ""


def test_png_without_matplotlib_names_the_plot_extra(tmp_path: Path) -> None:
    proc = conclave_without("matplotlib", "load", "--png", str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert proc.stderr == "conclave: --png needs matplotlib: pip install 'conclave-kernel[plot]'\n"


def test_a_halt_stops_the_load_and_reports_the_batches_done(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    halt_from_cli(halt_file, "maintenance")
    before = conclave("load", "--halt-file", str(halt_file), "--latency-ms", "1")
    assert before.returncode == 3 and "halted before starting: maintenance" in before.stderr
    assert before.stdout == ""


def test_a_halt_during_a_batch_stops_the_load_with_exit_3_and_reports_it(
    tmp_path: Path,
) -> None:
    halt_file = tmp_path / "halt.json"
    with subprocess.Popen(
        [
            *CONCLAVE,
            "load",
            "--batches",
            "5",
            "--latency-ms",
            "600000",
            "--json",
            "-",
            "--halt-file",
            str(halt_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert line.startswith("conclave: load: 5 batches of 72 agents"), line
            halt_from_cli(halt_file, "stop the load")
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 3, stderr
    doc = json.loads(stdout)
    assert doc["halt_reason"] == "stop the load" and not doc["passed"]
    # The halted batch is reported; its halted agents are the halt's, not failures.
    assert doc["batches"] == 1 and doc["agents"] == 72 and doc["failures"] == 0


def test_out_dir_gets_load_json_and_load_png(tmp_path: Path) -> None:
    proc = conclave(
        *("load", "--batches", "2", "--agents", "3", "--latency-ms", "1", "--out", str(tmp_path))
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "load.json").read_text())["batches"] == 2
    assert (tmp_path / "load.png").read_bytes().startswith(PNG_MAGIC)
    assert proc.stdout.startswith("conclave load: 2 batches x 3 agents")


def test_json_to_stdout_sends_the_text_report_to_stderr() -> None:
    proc = conclave("load", "--batches", "1", "--agents", "2", "--latency-ms", "1", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["batches"] == 1
    assert "PASS  p95 batch time < 30 s" in proc.stderr


def test_a_terminal_sees_a_live_progress_bar_of_the_batches() -> None:
    child = pexpect.spawn(
        CONCLAVE[0],
        [*CONCLAVE[1:], "load", "--batches", "3", "--agents", "4", "--latency-ms", "400"],
        cwd=str(ROOT),
        encoding="utf-8",
        timeout=30,
        dimensions=(24, 120),
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"},
    )
    try:
        child.expect("conclave: load: 3 batches of 4 agents")
        child.expect(r"load .*0/3")  # drawn while the first batch runs
        child.expect(r"load .*2/3")
        child.expect("PASS  p95 batch time < 30 s")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_quiet_or_a_pipe_gets_no_progress_bar() -> None:
    proc = conclave("load", "--batches", "2", "--agents", "2", "--latency-ms", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["conclave: load: 2 batches of 2 agents (stub backend)"]


def test_load_obeys_a_valkey_halt_and_shares_its_capacity() -> None:
    with ValkeyServer() as server:
        server.seed_capacity()
        cluster = ("--valkey", server.url, "--shared-capacity", "8")
        args = ("load", "--batches", "2", "--agents", "4", "--latency-ms", "1", "--json", "-")
        # A new server holds no halt record: halted until two approvers clear it.
        before = conclave(*args, *cluster)
        assert before.returncode == 3 and "halted before starting" in before.stderr
        both = ("--approver", "alice", "--approver", "bob", "--reason", "load test")
        assert conclave("clear", "--valkey", server.url, *both).returncode == 0
        proc = conclave(*args, *cluster)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["agents"] == 8 and doc["failures"] == 0 and doc["passed"]
