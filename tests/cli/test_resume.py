"""``conclave deliberate --resume BATCH_ID --witness-db FILE`` as an operator runs it:
after a halt and a clear, only the agents without a committed answer are called again."""

from __future__ import annotations

import json
import time
from pathlib import Path
from uuid import uuid4

import pytest

from adapters.witness.sqlite import verify_log
from tests.support.cli import announced_batch, conclave, deliberating, halt_from_cli
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.witness_helpers import select

AGENTS = ("a1", "a2", "a3", "a4")


@pytest.fixture
def council(tmp_path: Path) -> Path:
    roster = tmp_path / "council.toml"
    roster.write_text("".join(f'[[agents]]\nagent_id = "{a}"\n' for a in AGENTS))
    return roster


def _openai(server: FakeOpenAIServer, council: Path, *args: str) -> list[str]:
    return [
        "--backend", "openai", "--base-url", server.base_url, "--model", "m",
        "--roster", str(council), *args,
    ]  # fmt: skip


def _committed(db: Path) -> int:
    if not db.exists():
        return 0
    return int(select(db, "SELECT count(*) FROM outputs")[0][0])


def wait_until_committed(db: Path, count: int) -> None:
    """Until ``count`` outputs are in the log another process writes: its file is the only
    thing the test can observe."""
    deadline = time.monotonic() + 30
    while _committed(db) < count:
        assert time.monotonic() < deadline, f"{_committed(db)} of {count} committed"
        time.sleep(0.01)


@pytest.mark.slow
def test_after_a_halt_and_a_clear_a_resume_calls_only_the_agents_without_an_answer(
    llm_server: FakeOpenAIServer, council: Path, tmp_path: Path
) -> None:
    db, halt_file = tmp_path / "w.db", tmp_path / "halt.json"
    first_json, resumed_json = tmp_path / "first.json", tmp_path / "resumed.json"
    llm_server.script("a3", "hang")
    llm_server.script("a4", "hang")
    args = _openai(llm_server, council, "--witness-db", str(db), "--halt-file", str(halt_file))
    with deliberating(*args, "--json", str(first_json)) as proc:
        batch = announced_batch(proc)
        wait_until_committed(db, 2)
        halt_from_cli(halt_file, "operator stop")
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 3, stderr  # halted
    assert f"--resume {batch} --witness-db {db}" in stderr
    cleared = conclave(
        "clear", "--halt-file", str(halt_file), "--approver", "alice", "--approver", "bob",
        "--reason", "checked",
    )  # fmt: skip
    assert cleared.returncode == 0, cleared.stderr

    proc2 = conclave("deliberate", *args, "--resume", batch, "--json", str(resumed_json))
    assert proc2.returncode == 0, proc2.stderr
    assert f"batch {batch}: 2 answers resumed from the witness log, 2 outcomes" in proc2.stderr
    # a1 and a2 answered the first run: not called again; a3 and a4 once more each.
    assert {a: llm_server.attempts[a] for a in AGENTS} == {"a1": 1, "a2": 1, "a3": 2, "a4": 2}
    doc = json.loads(resumed_json.read_text())
    assert doc["batch_id"] == batch and doc["status"] == "completed"
    assert doc["counts"]["succeeded"] == 4 and doc["counts"]["resumed"] == 2
    assert {o["agent_id"]: o["resumed"] for o in doc["outcomes"]} == {
        "a1": True, "a2": True, "a3": False, "a4": False,
    }  # fmt: skip
    first = {o["agent_id"]: o for o in json.loads(first_json.read_text())["outcomes"]}
    for outcome in doc["outcomes"][:2]:
        assert outcome["output_id"] == first[outcome["agent_id"]]["output_id"]
    assert select(db, "SELECT agent_id, count(*) FROM outputs GROUP BY agent_id") == [
        (a, 1) for a in AGENTS
    ]
    assert verify_log(db).ok


def test_a_resume_without_a_witness_log_is_refused(tmp_path: Path) -> None:
    proc = conclave("deliberate", "--agents", "2", "--resume", str(uuid4()))
    assert proc.returncode == 2
    assert "--resume needs --witness-db" in proc.stderr


def test_a_resume_from_a_missing_log_is_refused_and_creates_none(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    proc = conclave(
        "deliberate", "--agents", "2", "--resume", str(uuid4()), "--witness-db", str(db)
    )
    assert proc.returncode == 2
    assert "no witness log there to resume from" in proc.stderr
    assert not db.exists()


def test_a_resume_that_is_not_a_batch_id_is_refused(tmp_path: Path) -> None:
    proc = conclave(
        "deliberate", "--agents", "2", "--resume", "last", "--witness-db", str(tmp_path / "w")
    )
    assert proc.returncode == 2
    assert "not a batch id" in proc.stderr


def test_a_resume_on_another_topic_is_refused_and_commits_nothing(tmp_path: Path) -> None:
    db = tmp_path / "w.db"
    first = conclave(
        "deliberate", "--agents", "3", "--latency-ms", "0", "--quiet", "--witness-db", str(db),
        "--fail-rate", "0.34", "--seed", "1", "--topic", "Adopt it?",
    )  # fmt: skip
    assert first.returncode == 1, first.stderr  # one agent failed: resumable
    batch = first.stderr.split("conclave: batch ")[1].split()[0]
    assert _committed(db) == 2
    other = conclave(
        "deliberate", "--agents", "3", "--latency-ms", "0", "--quiet", "--witness-db", str(db),
        "--resume", batch, "--topic", "Reject it?",
    )  # fmt: skip
    assert other.returncode == 2
    assert "context differs" in other.stderr
    assert _committed(db) == 2
