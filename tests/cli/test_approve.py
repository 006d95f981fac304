"""``conclave approve`` and the signed ``halt``/``clear`` as operators run them end to end:
each approver signs on their own, and the clear verifies both against the allowed-signers
file; every refusal is one line on stderr, exit 2, and changes nothing."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import pytest

from tests.support.cli import conclave
from tests.support.corrupt_halt_files import snapshot
from tests.support.ssh_keys import Keyring
from tests.support.valkey_server import ValkeyServer

pytestmark = pytest.mark.slow  # each command is a Python process of its own


@pytest.fixture
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    ring = Keyring(tmp_path_factory.mktemp("keys"))
    ring.trust("alice")
    ring.trust("bob")
    return ring


def approve(keys: Keyring, where: list[str], name: str, out: Path, *extra: str) -> None:
    proc = conclave(
        "approve",
        *where,
        "--key",
        str(keys.key(name)),
        "--principal",
        name,
        "--out",
        str(out),
        *extra,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"approval by {name} to clear halt" in proc.stderr


def test_two_people_approve_and_clear_a_halt_file_and_one_cannot_do_it_alone(
    tmp_path: Path, keys: Keyring
) -> None:
    halt_file = tmp_path / "halt.json"
    where = ["--halt-file", str(halt_file)]
    signers = ["--allowed-signers", str(keys.allowed), "--revoked", str(keys.revoked)]
    halted = conclave(
        "halt",
        *where,
        "--reason",
        "tool misuse",
        "--sign-key",
        str(keys.key("alice")),
        "--principal",
        "alice",
        *signers,
    )
    assert halted.returncode == 0, halted.stderr
    a, b, forged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "forged.json"
    approve(keys, where, "alice", a)
    approve(keys, where, "bob", b)
    forged.write_text(
        keys.approve(
            "bob", json.loads(halt_file.read_text())["halt_id"], "tool misuse", key_of="alice"
        )
    )
    before = snapshot(halt_file)
    refusals = {
        "names": ["--approver", "alice", "--approver", "bob"],
        "one": ["--approval", str(a)],
        "twice": ["--approval", str(a), "--approval", str(a)],
        "forged": ["--approval", str(a), "--approval", str(forged)],
    }
    messages = {}
    for case, given in refusals.items():
        proc = conclave("clear", *where, *signers, *given, "--reason", "alone")
        assert proc.returncode == 2 and proc.stdout == "", (case, proc.stdout)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        messages[case] = proc.stderr
        assert snapshot(halt_file) == before, case
    assert "requires signed approvals" in messages["names"]
    assert "got 1 approval" in messages["one"]
    assert "2 distinct principals, got 1 (alice)" in messages["twice"]
    assert "approval by 'bob' refused" in messages["forged"]

    cleared = conclave(
        "clear",
        *where,
        *signers,
        "--approval",
        str(a),
        "--approval",
        str(b),
        "--reason",
        "tool fixed",
    )
    assert cleared.returncode == 0 and cleared.stdout == "cleared\n", cleared.stderr
    status = conclave("status", *where)
    assert status.returncode == 0
    alice, bob = keys.fingerprint("alice"), keys.fingerprint("bob")
    assert f"halt by alice [{alice}]: tool misuse" in status.stdout
    assert f"clear by alice [{alice}], bob [{bob}]: tool fixed" in status.stdout

    # The same approvals do not clear the next halt.
    conclave("halt", *where, "--reason", "tool misuse")
    replay = conclave(
        "clear", *where, *signers, "--approval", str(a), "--approval", str(b), "--reason", "again"
    )
    assert replay.returncode == 2 and "is for another halt" in replay.stderr


def test_approve_refuses_when_there_is_no_halt_to_approve(tmp_path: Path, keys: Keyring) -> None:
    out = tmp_path / "a.json"
    proc = conclave(
        "approve",
        "--halt-file",
        str(tmp_path / "halt.json"),
        "--key",
        str(keys.key("alice")),
        "--principal",
        "alice",
        "--out",
        str(out),
    )
    assert proc.returncode == 2 and "not halted" in proc.stderr
    assert not out.exists()
    bad = conclave(
        "approve",
        "--halt-file",
        str(tmp_path / "halt.json"),
        "--key",
        str(keys.key("alice")),
        "--principal",
        "alice",
        "--expires",
        "3d",
    )
    assert bad.returncode == 2 and "--expires" in bad.stderr
    # As the SPEC writes it (no --principal): the signer is named by the login name.
    conclave("halt", "--halt-file", str(tmp_path / "halt.json"), "--reason", "audit")
    spec = conclave(
        "approve", "--halt-file", str(tmp_path / "halt.json"), "--key", str(keys.key("alice"))
    )
    assert spec.returncode == 0, spec.stderr
    assert spec.stderr.startswith(f"approval by {getpass.getuser()} to clear halt")
    assert json.loads(spec.stdout)["schema"] == "conclave.approval/1"


def test_two_people_clear_a_valkey_halt_with_signed_approvals(
    tmp_path: Path, keys: Keyring
) -> None:
    with ValkeyServer() as server:  # its own: the default halt key, as operators use it
        signed_clear_on_valkey(server.url, tmp_path, keys)


def signed_clear_on_valkey(url: str, tmp_path: Path, keys: Keyring) -> None:
    where = ["--valkey", url]
    signers = ["--allowed-signers", str(keys.allowed)]
    assert conclave("halt", *where, "--reason", "audit").returncode == 0
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    approve(keys, where, "alice", a, "--expires", "5m")
    approve(keys, where, "bob", b)
    names = conclave(
        "clear", *where, *signers, "--approver", "x", "--approver", "y", "--reason", "r"
    )
    assert names.returncode == 2 and "requires signed approvals" in names.stderr
    cleared = conclave(
        "clear", *where, *signers, "--approval", str(a), "--approval", str(b), "--reason", "ok"
    )
    assert cleared.returncode == 0 and cleared.stdout == "cleared\n", cleared.stderr
