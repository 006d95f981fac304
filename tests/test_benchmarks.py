"""The benchmarks as a user runs them (``python -m benchmarks.run`` and ``.compare``), on
their fastest settings.  Timings are not asserted (wall clock on a shared machine): what a
run prints and writes is."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.report import README_END, README_START, fill_numbers, update_readme
from tests.support import ROOT


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_run_prints_and_writes_the_rows_of_the_scenarios_asked_for(tmp_path: Path) -> None:
    proc = bench("benchmarks.run", "--quick", "--only", "witness", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    printed = [line for line in proc.stdout.splitlines() if line.startswith("| witness ")]
    assert len(printed) == 4  # as the scenario finishes, then in the whole table
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["mode"] == "quick"
    assert [row["variant"] for row in document["rows"]] == [
        "SqliteWitness synchronous=FULL",
        "SqliteWitness synchronous=NORMAL",
    ]
    for row in document["rows"]:
        assert len(row["samples"]) == 5  # quick: 5 reps
        assert row["median"] == statistics.median(row["samples"])
        # Group commit: a 72-agent batch costs a transaction or two, never 72.
        note = re.fullmatch(r"([0-9.]+) transactions per batch \(group commit\)", row["note"])
        assert note is not None and 1.0 <= float(note.group(1)) <= 2.0, row["note"]
    assert (tmp_path / "results.md").read_text().count("| witness 72 commits |") == 2
    assert not (tmp_path / "agents_vs_elapsed.png").exists()  # --only: no plot


def test_run_refuses_an_unknown_scenario_before_running_anything(tmp_path: Path) -> None:
    proc = bench("benchmarks.run", "--only", "nope", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "invalid choice: 'nope'" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_update_readme_replaces_only_what_stands_between_the_markers(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nold table\n{README_END}\nafter\n")
    assert update_readme(readme, "new table\n")
    assert readme.read_text() == f"intro\n{README_START}\nnew table\n{README_END}\nafter\n"


def test_update_readme_without_both_markers_changes_nothing(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_START}\nno end marker\n")
    assert not update_readme(readme, "new table\n")
    assert readme.read_text() == f"intro\n{README_START}\nno end marker\n"


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_compare_puts_the_kernel_of_a_commit_next_to_this_trees() -> None:
    proc = bench(
        "benchmarks.compare", "--baseline-ref", "HEAD", "--rounds", "1", "--reps", "1",
        "--repeat", "1",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert [(row[1], row[2]) for row in rows[1:]] == [
        ("kernel @ HEAD", "cost per agent"),
        ("bare-trio @ HEAD", "cost per agent"),
        ("kernel @ working tree", "cost per agent"),
        ("bare-trio @ working tree", "cost per agent"),
        ("kernel / bare-trio @ HEAD", "ratio"),
        ("kernel / bare-trio @ working tree", "ratio"),
        ("working tree / baseline", "ratio of ratios"),
    ]


def test_compare_refuses_a_ref_that_is_not_a_commit() -> None:
    proc = bench("benchmarks.compare", "--baseline-ref", "no-such-ref")
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: cannot export 'no-such-ref': fatal:")
    assert proc.stdout == ""


def test_prose_numbers_are_set_from_the_rows_they_name() -> None:
    rows = [
        {"scenario": "s", "variant": "v", "metric": "m", "unit": "ms", "median": 11.4},
        {"scenario": "s", "variant": "v", "metric": "r", "unit": "x", "median": 1.0432},
    ]
    text = "a <!--bench:s|v|m-->9 ms<!--/bench--> b <!--bench:s|v|r-->?<!--/bench--> c"
    filled, unknown = fill_numbers(text, rows)
    assert (
        filled
        == "a <!--bench:s|v|m-->11.4 ms<!--/bench--> b <!--bench:s|v|r-->1.04x<!--/bench--> c"
    )
    assert unknown == []
    _, unknown = fill_numbers("<!--bench:s|v|gone-->1 s<!--/bench-->", rows)
    assert unknown == ["s | v | gone"]


def test_every_number_in_the_readme_prose_is_the_latest_results() -> None:
    """The README's numbers are written by `make bench`, never by hand: each names a row of
    benchmarks/results/results.json and shows its median."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = json.loads((ROOT / "benchmarks" / "results" / "results.json").read_text())["rows"]
    filled, unknown = fill_numbers(readme, rows)
    assert unknown == []
    assert filled == readme, "run `make bench` (or fill_numbers) after editing the results"
