"""The halt file is fail-closed: every corrupt shape reads as halted, never clear, never
an exception; ``halt`` can always rewrite it; ``clear`` refuses what it cannot read."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings

from adapters.halt.document import SCHEMA
from adapters.halt.file import MAX_HALT_FILE_BYTES, FileHaltChannel, HaltFileState
from kernel import DualChannelHaltChecker, HaltClearDeniedError, HaltSwitch
from tests.support.cli import conclave
from tests.support.halt_documents import contents, expected_reading

DEEP = b'{"halted": true, "reason": "x", "history": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
DEEP_CLEAR = b'{"halted": false, "pad": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
GOOD_RECORD = {"action": "halt", "reason": "r", "at": "2026-01-01T00:00:00+00:00"}


def _json(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def _history(*records: Any) -> bytes:
    return _json({"schema": SCHEMA, "halted": False, "reason": None, "history": list(records)})


# Contents that must read as halted.  Most of them *say* "halted": false: a reader
# that trusted what it could parse would fail open.
CORRUPT_CONTENTS: dict[str, bytes] = {
    "empty": b"",
    "whitespace": b" \n\t",
    "deeply nested, halted true": DEEP,
    "deeply nested, halted false": DEEP_CLEAR,
    "binary": bytes(range(256)),
    "latin-1, not UTF-8": '{"halted": false, "reason": "é"}'.encode("latin-1"),
    "UTF-16": '{"halted": false}'.encode("utf-16"),
    "UTF-8 BOM": b"\xef\xbb\xbf" + b'{"halted": false}',
    "truncated": b'{"halted": false, "history": [',
    "top level list": b"[]",
    "top level false": b"false",
    "top level null": b"null",
    "halted missing": b'{"reason": null}',
    "halted a string": b'{"halted": "false"}',
    "halted zero": b'{"halted": 0}',
    "halted null": b'{"halted": null}',
    "reason a number": b'{"halted": false, "reason": 5}',
    "reason a list": b'{"halted": true, "reason": ["a"]}',
    "reason a lone surrogate": b'{"halted": true, "reason": "\\ud800"}',
    "duplicate key": b'{"halted": true, "halted": false}',
    "NaN": b'{"halted": false, "x": NaN}',
    "huge integer": b'{"halted": false, "x": ' + b"1" * 5000 + b"}",
    "unknown schema": b'{"schema": "conclave.halt/2", "halted": false}',
    "no schema": b'{"halted": false, "reason": null}',
    "halted without a reason": b'{"schema": "conclave.halt/1", "halted": true}',
    "halted with a blank reason": b'{"schema": "conclave.halt/1", "halted": true, "reason": " "}',
    "history an object": b'{"halted": false, "history": {}}',
    "history item a string": _history("halt"),
    "history item unknown action": _history({**GOOD_RECORD, "action": "resume"}),
    "history item without reason": _history({"action": "halt", "at": GOOD_RECORD["at"]}),
    "history item reason a number": _history({**GOOD_RECORD, "reason": 1}),
    "history item at a number": _history({**GOOD_RECORD, "at": 1}),
    "history item at not a date": _history({**GOOD_RECORD, "at": "yesterday"}),
    "history item approvers a string": _history({**GOOD_RECORD, "approvers": "ab"}),
    "history item approver a number": _history({**GOOD_RECORD, "approvers": ["a", 2]}),
    "history item nested deep": _history({**GOOD_RECORD, "approvers": [[[["a"]]]]}),
    "too large": b'{"halted": false, "pad": "' + b"x" * MAX_HALT_FILE_BYTES + b'"}',
}


def _make_file(content: bytes) -> Callable[[Path], object]:
    return lambda path: path.write_bytes(content)


def _make_dir(path: Path) -> None:
    path.mkdir()
    (path / "inside").write_text("{}")


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)  # opening it for reading would block without O_NONBLOCK


def _make_dangling_link(path: Path) -> None:
    path.symlink_to(path.with_name("nowhere.json"))


SHAPES: dict[str, Callable[[Path], object]] = {
    **{name: _make_file(content) for name, content in CORRUPT_CONTENTS.items()},
    "a directory": _make_dir,
    "a FIFO": _make_fifo,
    "a dangling symlink": _make_dangling_link,
}


def _snapshot(path: Path) -> tuple[bool, bytes | None, list[str]]:
    """What is at the path (is-a-file, bytes) and every name beside it (but the lock's)."""
    is_file = path.is_file() and not path.is_symlink()
    names = sorted(n for n in os.listdir(path.parent) if not n.endswith(".lock"))
    return is_file, path.read_bytes() if is_file else None, names


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
async def test_corrupt_shape_reads_halted_and_halt_rewrites_it(
    tmp_path: Path, shape: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "halt.json"
    SHAPES[shape](path)
    channel = FileHaltChannel(path, lock_timeout=0.5)

    state = channel.read_state()
    assert state.halted and state.error is not None
    assert state.reason is not None and "treated as halted" in state.reason
    assert "corrupt halt file" in state.reason or "cannot read" in state.reason
    assert state.history == ()
    assert await channel.is_halted()
    assert await channel.get_halt_reason() == state.reason
    # Through the dual checker as the CLI wires it: halted, not "the other channel decides".
    dual = DualChannelHaltChecker(HaltSwitch(), channel)
    assert await dual.is_halted()
    assert dual.read_errors == {"primary": 0, "secondary": 0}
    with trio.fail_after(5):
        assert (await dual.wait_halted()) == state.reason

    # Clearing what cannot be read is refused, and changes nothing.
    before = _snapshot(path)
    with pytest.raises(HaltClearDeniedError, match=r"unreadable.*conclave halt"):
        channel.clear(approvers=["alice", "bob"], reason="looks fine to me")
    with pytest.raises(HaltClearDeniedError):
        await channel.aclear(approvers=["alice", "bob"], reason="looks fine to me")
    assert _snapshot(path) == before

    # Halting rewrites it into a readable halted file and keeps the old entry aside.
    assert channel.halt("operator confirms") is True
    good = channel.read_state()
    assert good == HaltFileState(True, "operator confirms", good.history, None)
    assert [(r.action, r.reason) for r in good.history] == [("halt", "operator confirms")]
    assert channel.kept_aside is not None
    assert channel.kept_aside.name.startswith("halt.json.corrupt-")
    if before[0]:
        assert channel.kept_aside.read_bytes() == before[1]  # the evidence is intact
    assert channel.kept_aside.is_symlink() or channel.kept_aside.exists()
    assert any("replaced" in r.message for r in caplog.records)
    # ...and now it can be cleared like any halt.
    await channel.aclear(approvers=["alice", "bob"], reason="file repaired")
    assert not await channel.is_halted()


async def test_corrupt_file_is_logged_once_per_problem_not_per_poll(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "halt.json"
    path.write_bytes(DEEP_CLEAR)
    channel = FileHaltChannel(path)
    for _ in range(3):
        assert await channel.is_halted()
    path.write_bytes(b"[]")
    assert await channel.is_halted()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2
    for record in errors:  # the problem is named; the content is not logged
        assert "RecursionError" in record.problem or "list" in record.problem  # type: ignore[attr-defined]


def test_a_halt_waits_for_a_stuck_lock_holder_only_so_long_and_clear_refuses(
    tmp_path: Path,
) -> None:
    path = tmp_path / "halt.json"
    channel = FileHaltChannel(path, lock_timeout=0.1)
    assert channel.halt("first") is True
    lock_path = tmp_path / "halt.json.lock"
    with open(lock_path, "a+b") as holder:  # another process, stuck while holding the lock
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
        with pytest.raises(HaltClearDeniedError, match="held for more than"):
            channel.clear(approvers=["a", "b"], reason="fixed")
        assert channel.read_state().halted
        # A halt over a corrupt file still goes through.
        path.write_bytes(b"garbage")
        assert channel.halt("stuck lock or not") is True
    assert channel.read_state().reason == "stuck lock or not"


def test_lock_file_that_cannot_be_opened_does_not_stop_a_halt(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    (tmp_path / "halt.json.lock").mkdir()  # open() of the lock fails
    channel = FileHaltChannel(path)
    assert channel.halt("no lock needed to stop") is True
    assert channel.read_state().reason == "no lock needed to stop"
    with pytest.raises(HaltClearDeniedError, match="cannot open"):
        channel.clear(approvers=["a", "b"], reason="fixed")
    assert channel.read_state().halted


def test_history_is_trimmed_to_stay_readable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "halt.json"
    record = {**GOOD_RECORD, "reason": "r" * 1000, "approvers": []}

    def doc(n: int) -> bytes:
        body = {"schema": "conclave.halt/1", "halted": False, "reason": None}
        return (json.dumps({**body, "history": [record] * n}, indent=2) + "\n").encode()

    per_record = len(doc(2)) - len(doc(1))
    n = (MAX_HALT_FILE_BYTES - len(doc(0))) // per_record
    path.write_bytes(doc(n))  # just under the limit: readable
    assert MAX_HALT_FILE_BYTES - per_record < len(doc(n)) <= MAX_HALT_FILE_BYTES
    channel = FileHaltChannel(path)
    assert channel.read_state().error is None
    one_more = "one more " + "m" * 1000
    assert channel.halt(one_more) is True  # one more record would not fit
    state = channel.read_state()
    assert state.error is None and state.reason == one_more
    assert path.stat().st_size <= MAX_HALT_FILE_BYTES
    assert state.history[-1].reason == one_more
    assert n // 2 < len(state.history) <= n  # the oldest were dropped, not everything
    assert any(r.message == "halt file history trimmed to fit" for r in caplog.records)


# ---------------------------------------------------------------- property


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(contents)
def test_any_content_is_a_valid_state_or_halted(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "halt.json"
        path.write_bytes(content)
        channel = FileHaltChannel(path)
        state = channel.read_state()  # never raises
        assert isinstance(state, HaltFileState) and isinstance(state.halted, bool)
        expected = expected_reading(content)
        if expected == "corrupt":
            assert state.halted and state.error is not None and state.history == ()
            # halting over it always works and gives a readable halted file
            assert channel.halt("fuzz") is True
            assert channel.read_state() == HaltFileState(
                True, "fuzz", channel.read_state().history, None
            )
        else:  # a well-formed document is read as it says, never as corrupt
            assert state.error is None
            assert state.halted == (expected == "halted")
            assert state.halted or state.reason is None
        for record in state.history:
            assert record.action in ("halt", "clear") and isinstance(record.reason, str)
            assert record.at.tzinfo is not None
            assert all(isinstance(a, str) for a in record.approvers)


# ---------------------------------------------------------------- the CLI on a corrupt file


CLI_SHAPES = ["deeply nested, halted false", "binary", "halted a string", "a directory"]


@pytest.mark.parametrize("shape", CLI_SHAPES)
def test_cli_on_a_corrupt_halt_file(tmp_path: Path, shape: str) -> None:
    path = tmp_path / "halt.json"
    SHAPES[shape](path)
    before = _snapshot(path)

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
    assert _snapshot(path) == before

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


async def test_a_path_that_cannot_be_opened_reads_halted(tmp_path: Path) -> None:
    """The OSError path of reading (as root, permissions cannot deny a read; a parent
    that is a file can): halted, and a halt that cannot be written says why."""
    (tmp_path / "not-a-dir").write_text("x")
    path = tmp_path / "not-a-dir" / "halt.json"
    channel = FileHaltChannel(path)
    state = channel.read_state()
    assert state.halted and state.error is not None and "cannot read" in state.error
    assert await channel.is_halted()
    with pytest.raises(OSError):
        channel.halt("cannot be written here")
    proc = conclave("halt", "--halt-file", str(path), "--reason", "r")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("conclave: ") and "Traceback" not in proc.stderr
    status = conclave("status", "--halt-file", str(path))
    assert status.returncode == 3 and "cannot read" in status.stdout


def test_a_file_renamed_in_between_open_and_look_is_read_not_called_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process's atomic rename can land after our open() found nothing and before
    we look at what is there: that is a fresh file, not a dangling symlink."""
    path = tmp_path / "halt.json"
    writer = FileHaltChannel(tmp_path / "staging.json")
    writer.halt("from elsewhere")
    real_open = os.open
    calls = 0

    def racing_open(target: Any, flags: int, *args: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1 and Path(target) == path:
            os.rename(tmp_path / "staging.json", path)  # lands right after our miss
            raise FileNotFoundError(target)
        return real_open(target, flags, *args)

    monkeypatch.setattr(os, "open", racing_open)
    state = FileHaltChannel(path).read_state()
    assert state.halted and state.reason == "from elsewhere"
