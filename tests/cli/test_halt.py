"""``conclave halt|clear|status`` on a halt file (adapters.cli._halt; the same commands on a
Valkey key: test_valkey.py), as an operator runs them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.cli import conclave
from tests.support.corrupt_halt_files import CLI_SHAPES, SHAPES, snapshot


def test_halt_clear_status_commands(tmp_path: Path) -> None:
    halt_file = tmp_path / "halt.json"
    assert conclave("status", "--halt-file", str(halt_file)).stdout.startswith("not halted")
    proc = conclave("halt", "--halt-file", str(halt_file), "--reason", "quorum lost")
    assert proc.returncode == 0 and "halted: quorum lost" in proc.stdout
    proc = conclave("halt", "--halt-file", str(halt_file), "--reason", "again")
    assert "already halted: quorum lost" in proc.stdout
    status = conclave("status", "--halt-file", str(halt_file))
    assert status.returncode == 3 and status.stdout.startswith("HALTED: quorum lost")
    # a halted system refuses to start
    proc = conclave("deliberate", "--halt-file", str(halt_file), "--latency-ms", "1")
    assert proc.returncode == 3 and "halted before starting: quorum lost" in proc.stderr
    proc = conclave(
        "clear",
        "--halt-file",
        str(halt_file),
        "--approver",
        "alice",
        "--approver",
        "bob",
        "--reason",
        "quorum restored",
    )
    assert proc.returncode == 0 and "cleared" in proc.stdout
    status = conclave("status", "--halt-file", str(halt_file))
    assert status.returncode == 0
    assert "clear by alice, bob: quorum restored" in status.stdout


def test_a_halt_file_whose_directory_does_not_exist_is_refused_unless_created(
    tmp_path: Path,
) -> None:
    """A mistyped --halt-file would be a halt nobody watches (or a council watching a
    file nobody writes): every command refuses it, exit 2, creating nothing; halt and
    deliberate make the directory with --create."""
    typo = tmp_path / "typo" / "x" / "halt.json"
    both = ["--approver", "alice", "--approver", "bob"]
    refused = {
        "halt": conclave("halt", "--halt-file", str(typo), "--reason", "r"),
        "clear": conclave("clear", "--halt-file", str(typo), *both, "--reason", "r"),
        "status": conclave("status", "--halt-file", str(typo)),
        "deliberate": conclave("deliberate", "--halt-file", str(typo), "--latency-ms", "1"),
    }
    for command, proc in refused.items():
        assert proc.returncode == 2 and proc.stdout == "", (command, proc.stdout)
        assert proc.stderr.startswith(f"conclave: --halt-file {typo}: {typo.parent} does not ")
        assert len(proc.stderr.splitlines()) == 1
        assert ("--create makes it" in proc.stderr) == (command in ("halt", "deliberate"))
    assert not (tmp_path / "typo").exists()

    created = conclave("halt", "--halt-file", str(typo), "--create", "--reason", "audit")
    assert created.returncode == 0 and created.stdout == "halted: audit\n"
    run = conclave("deliberate", "--halt-file", str(typo), "--latency-ms", "1", "--quiet")
    assert run.returncode == 3 and "halted before starting: audit" in run.stderr
    watched = tmp_path / "new" / "halt.json"
    run = conclave("deliberate", "--halt-file", str(watched), "--create", "--agents", "2")
    assert run.returncode == 0 and watched.parent.is_dir() and not watched.exists()

    not_a_directory = tmp_path / "file"  # it exists: the channel's to report (halted)
    not_a_directory.write_text("")
    proc = conclave("halt", "--halt-file", str(not_a_directory / "h"), "--create", "--reason", "r")
    assert proc.returncode == 2 and proc.stdout == "" and "Traceback" not in proc.stderr
    assert not_a_directory.read_text() == ""
    proc = conclave("halt", "--valkey", "redis://127.0.0.1:1", "--create", "--reason", "r")
    assert proc.returncode == 2 and "--create goes with --halt-file" in proc.stderr


@pytest.mark.parametrize("shape", CLI_SHAPES)
def test_cli_on_a_corrupt_halt_file(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "halt.json"
    SHAPES[shape](path)
    before = snapshot(path)

    status = conclave("status", "--halt-file", str(path))
    assert status.returncode == 3, status.stderr
    assert status.stdout.startswith("HALTED: halt file unreadable (corrupt halt file")
    assert "conclave halt" in status.stdout  # says how to repair it
    assert status.stderr == ""

    clear = conclave(
        "clear", "--halt-file", str(path), "--approver", "a", "--approver", "b", "--reason", "r"
    )
    assert clear.returncode == 2
    assert clear.stdout == ""
    assert clear.stderr.count("\n") == 1 and "Traceback" not in clear.stderr
    assert "unreadable" in clear.stderr and "conclave halt" in clear.stderr
    assert snapshot(path) == before

    run = conclave("deliberate", "--halt-file", str(path), "--agents", "3", "--latency-ms", "1")
    assert run.returncode == 3, run.stderr
    assert "halted before starting: halt file unreadable" in run.stderr
    assert "Traceback" not in run.stderr

    halt = conclave("halt", "--halt-file", str(path), "--reason", "operator rewrites it")
    assert halt.returncode == 0, halt.stderr
    assert halt.stdout.startswith("halted: operator rewrites it\n")
    assert "the unreadable halt file was kept as" in halt.stdout
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("halt.json.corrupt-")]
    assert len(kept) == 1 and kept[0].name in halt.stdout

    status = conclave("status", "--halt-file", str(path))
    assert status.returncode == 3 and status.stdout.startswith("HALTED: operator rewrites it\n")
    clear = conclave(
        "clear", "--halt-file", str(path), "--approver", "a", "--approver", "b", "--reason", "ok"
    )
    assert clear.returncode == 0 and clear.stdout == "cleared\n", clear.stderr
    assert conclave("status", "--halt-file", str(path)).returncode == 0


def test_clear_refuses_an_approval_path_that_is_endless_or_a_silent_fifo(tmp_path: Path) -> None:
    """--approval /dev/zero is refused by its size, not read into memory; a FIFO nobody
    writes to reads as empty (not an approval) instead of hanging the clear."""
    path = tmp_path / "halt.json"
    assert conclave("halt", "--halt-file", str(path), "--reason", "r").returncode == 0
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("")
    fifo = tmp_path / "approval.fifo"
    os.mkfifo(fifo)
    before = snapshot(path)
    signed = ["--allowed-signers", str(allowed), "--reason", "ok"]
    endless = conclave(
        "clear", "--halt-file", str(path), "--approval", "/dev/zero", "--approval", "/dev/zero",
        *signed, timeout=30,
    )  # fmt: skip
    assert endless.returncode == 2, endless.stderr
    assert endless.stderr.startswith("conclave: --approval /dev/zero: larger than 65536 bytes")
    silent = conclave(
        "clear", "--halt-file", str(path), "--approval", str(fifo), "--approval", str(fifo),
        *signed, timeout=30,
    )  # fmt: skip
    assert silent.returncode == 2 and "an approval is not JSON" in silent.stderr, silent.stderr
    assert snapshot(path) == before


def test_leaving_out_allowed_signers_does_not_let_one_operator_clear_by_typed_names(
    tmp_path: Path,
) -> None:
    path = tmp_path / "halt.json"
    allowed = tmp_path / "allowed_signers"
    allowed.write_text("")
    halt = conclave(
        "halt", "--halt-file", str(path), "--allowed-signers", str(allowed), "--reason", "r"
    )
    assert halt.returncode == 0, halt.stderr
    before = snapshot(path)
    names = ["--approver", "alice", "--approver", "bob", "--reason", "alone"]
    clear = conclave("clear", "--halt-file", str(path), *names)
    assert clear.returncode == 2 and "requires signed approvals" in clear.stderr, clear.stderr
    assert snapshot(path) == before
