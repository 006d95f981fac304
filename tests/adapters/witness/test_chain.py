"""The audit never writes to what it audits, and refuses what is not a witness log."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from uuid import uuid4

import pytest
import trio
import trio.testing

from adapters.witness.sqlite import (
    SqliteWitness,
    VerifyReport,
    WitnessError,
    log_head,
    verify_log,
)
from kernel import (
    AgentOutput,
    InvalidRequestError,
)
from tests.support.cli import conclave
from tests.support.witness_helpers import make_log, run_sql, select


def _fingerprint(path: Path) -> dict[str, tuple[str, int] | None]:
    """Bytes (hash) and mtime of the file and of its side files (None: absent)."""
    found: dict[str, tuple[str, int] | None] = {}
    for suffix in ("", "-wal", "-shm", "-journal"):
        p = Path(f"{path}{suffix}")
        if p.is_file():
            found[suffix] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            found[suffix] = None if not p.exists() else ("not a file", 0)
    return found


# A copy of the outputs table without types or constraints, so any value can go in.
_UNTYPED = (
    "CREATE TABLE o2 (sequence, output_id, agent_id, request_id, batch_id, content_hash,"
    " content_type, generated_at, committed_at, metadata, content, prev_hash, chain_hash);"
    "INSERT INTO o2 SELECT * FROM outputs; DROP TABLE outputs;"
    "ALTER TABLE o2 RENAME TO outputs;"
)


def test_verify_changes_no_byte_and_creates_no_side_file(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    head = make_log(path)
    before = _fingerprint(path)
    assert before["-wal"] is None and before["-shm"] is None  # closed cleanly
    report = verify_log(path, expected_head=head)
    assert report == VerifyReport(True, 5, head=head)
    proc = conclave("verify", str(path), "--expected-head", head)
    assert proc.returncode == 0 and proc.stdout == f"ok: 5 records, chain intact, head {head}\n"
    assert _fingerprint(path) == before
    assert sorted(os.listdir(tmp_path)) == ["w.db"]


async def test_verify_beside_a_live_writer_changes_neither_db_nor_wal(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        for i in range(3):
            await witness.commit(AgentOutput(f"archon-{i}", uuid4(), f"a{i}"))
        before = _fingerprint(path)
        assert before["-wal"] is not None  # the writer is open: WAL mode, in use
        report = await trio.to_thread.run_sync(verify_log, path)
        assert report.ok and report.records == 3
        after = _fingerprint(path)
        assert (after[""], after["-wal"]) == (before[""], before["-wal"])
        assert (await witness.verify()).records == 3  # the writer's verify is the same audit


def _unrelated_sqlite(path: Path) -> None:
    run_sql(path, "CREATE TABLE accounts (id INTEGER PRIMARY KEY, name TEXT);")


def _text_file(path: Path) -> None:
    path.write_text("these are not the droids\n")


def _dropped_table(path: Path) -> None:
    make_log(path)
    run_sql(path, "DROP TABLE outputs;")


def _renamed_column(path: Path) -> None:
    make_log(path)
    run_sql(path, "ALTER TABLE outputs RENAME COLUMN content TO body;")


def _directory(path: Path) -> None:
    path.mkdir()


NOT_A_LOG: dict[str, tuple[Callable[[Path], object], str]] = {
    "nonexistent": (lambda _path: None, "no such witness log"),
    "empty file": (lambda path: path.write_bytes(b""), "no outputs table"),
    "directory": (_directory, "not a regular file"),
    "unrelated SQLite file": (_unrelated_sqlite, "no outputs table"),
    "not SQLite": (_text_file, "not a witness log"),
    "outputs table dropped": (_dropped_table, "no outputs table"),
    "column renamed": (_renamed_column, "outputs table lacks content"),
}


@pytest.mark.parametrize("shape", list(NOT_A_LOG))
def test_not_a_witness_log_is_refused_and_left_untouched(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "w.db"
    make, message = NOT_A_LOG[shape]
    make(path)
    before = _fingerprint(path)
    names = sorted(os.listdir(tmp_path))

    with pytest.raises(WitnessError, match=message):
        verify_log(path)
    proc = conclave("verify", str(path))
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    assert proc.stderr.startswith("conclave: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr and "Traceback" not in proc.stderr

    assert _fingerprint(path) == before  # not a byte, not a journal-mode switch
    assert sorted(os.listdir(tmp_path)) == names  # nothing created (the log included)


BROKEN_ROWS: dict[str, tuple[str, int | None, str]] = {
    "content NULL": (
        _UNTYPED + "UPDATE outputs SET content = NULL WHERE sequence = 3;",
        3,
        "column content holds NULL where text was expected",
    ),
    "content a BLOB": (
        "UPDATE outputs SET content = CAST(content AS BLOB) WHERE sequence = 2;",
        2,
        "column content holds BLOB",
    ),
    "agent_id a number": (
        _UNTYPED + "UPDATE outputs SET agent_id = 42 WHERE sequence = 4;",
        4,
        "column agent_id holds INTEGER",
    ),
    "metadata a float": (
        _UNTYPED + "UPDATE outputs SET metadata = 1.5 WHERE sequence = 1;",
        1,
        "column metadata holds REAL",
    ),
    "content invalid UTF-8": (
        "UPDATE outputs SET content = CAST(x'ff00fe' AS TEXT) WHERE sequence = 5;",
        5,
        "column content holds invalid UTF-8",
    ),
    "prev_hash NULL": (
        _UNTYPED + "UPDATE outputs SET prev_hash = NULL WHERE sequence = 2;",
        2,
        "column prev_hash holds NULL",
    ),
    "sequence text": (  # text sorts after every number: found after 1..4
        _UNTYPED + "UPDATE outputs SET sequence = 'five' WHERE sequence = 5;",
        None,
        "column sequence holds TEXT where an integer was expected",
    ),
    "sequence NULL": (
        _UNTYPED + "UPDATE outputs SET sequence = NULL WHERE sequence = 1;",
        None,
        "column sequence holds NULL",
    ),
}


@pytest.mark.parametrize("shape", list(BROKEN_ROWS))
def test_wrong_typed_values_are_a_broken_chain_not_a_traceback(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "w.db"
    make_log(path)
    sql, first_bad, problem = BROKEN_ROWS[shape]
    run_sql(path, sql)
    before = _fingerprint(path)
    report = verify_log(path)
    assert not report.ok
    assert report.first_bad_sequence == first_bad
    assert report.problem is not None and problem in report.problem
    proc = conclave("verify", str(path))
    assert proc.returncode == 1, proc
    assert proc.stdout.startswith("BROKEN at ") and proc.stdout.count("\n") == 1
    assert problem in proc.stdout
    assert "Traceback" not in proc.stderr
    assert _fingerprint(path) == before


async def test_viewing_a_wrong_typed_row_is_refused_as_tampered(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    async with SqliteWitness(path) as witness:
        outputs = [AgentOutput(f"archon-{i}", uuid4(), f"a{i}") for i in range(3)]
        for output in outputs:
            await witness.commit(output)
        run_sql(path, "UPDATE outputs SET content = CAST(content AS BLOB) WHERE sequence = 2;")
        with pytest.raises(WitnessError, match="tampered"):
            await witness.get_for_viewing(outputs[1].output_id, "auditor")
        run_sql(path, "UPDATE outputs SET content = CAST(x'ff' AS TEXT) WHERE sequence = 3;")
        with pytest.raises(WitnessError, match="tampered"):
            await witness.get_for_viewing(outputs[2].output_id, "auditor")
        assert await witness.get_for_viewing(outputs[0].output_id, "auditor") == outputs[0]


@pytest.mark.parametrize("head", ["", "zz", "A" * 64, "0" * 63])
def test_a_malformed_expected_head_is_bad_input(tmp_path: Path, head: str) -> None:
    path = tmp_path / "w.db"
    make_log(path, 1)
    with pytest.raises(InvalidRequestError, match="expected_head"):
        verify_log(path, expected_head=head)
    proc = conclave("verify", str(path), "--expected-head", head)
    assert proc.returncode == 2 and "expected_head" in proc.stderr


def test_verify_refuses_a_view_named_outputs(tmp_path: Path) -> None:
    """Guards against: "ok: 0 records, chain intact" (exit 0) for a database whose ``outputs`` is a
    view with the witness's column names: an audit must fail on what is not a log."""
    make_log(tmp_path / "real.db", 1)
    columns = [row[1] for row in select(tmp_path / "real.db", "PRAGMA table_info(outputs)")]
    db_path = tmp_path / "view.db"
    nulls = ", ".join(f"NULL AS {c}" for c in columns)
    run_sql(db_path, f"CREATE VIEW outputs AS SELECT {nulls} WHERE 0")
    before = db_path.read_bytes()
    with pytest.raises(WitnessError, match="not a witness log"):
        verify_log(db_path)
    proc = conclave("verify", str(db_path))
    assert proc.returncode == 2, proc.stdout
    assert "not a witness log" in proc.stderr and "Traceback" not in proc.stderr
    assert db_path.read_bytes() == before


def test_log_head_is_the_last_records_chain_hash_without_walking_the_chain(
    tmp_path: Path,
) -> None:
    path = tmp_path / "w.db"
    head = make_log(path)
    before = _fingerprint(path)
    assert log_head(path) == (5, head)
    assert _fingerprint(path) == before  # read-only, like verify


def test_log_head_of_what_is_not_a_witness_log_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WitnessError, match="no such witness log"):
        log_head(tmp_path / "missing.db")
