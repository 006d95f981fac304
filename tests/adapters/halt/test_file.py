"""FileHaltChannel: durable, atomic, sticky, fail-safe, cross-process; bounded on a hung
filesystem; fail-closed (every corrupt shape reads halted, never clear, never an
exception; ``halt`` can always rewrite it; ``clear`` refuses what it cannot read)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing
from hypothesis import HealthCheck, given, settings

from adapters.halt.approval import ApprovalRefusedError, SignatureVerifier, SignedStatement
from adapters.halt.file import MAX_HALT_FILE_BYTES, FileHaltChannel, HaltFileState
from kernel import (
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltClearDeniedError,
    HaltSwitch,
    HaltWaiter,
    InvalidRequestError,
    SystemHaltedError,
)
from tests.support import ROOT
from tests.support.cli import conclave
from tests.support.corrupt_halt_files import (
    DEEP_CLEAR,
    GOOD_RECORD,
    SHAPES,
    snapshot,
)
from tests.support.halt_documents import contents, expected_reading
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests
from tests.support.ssh_keys import Keyring


async def test_missing_file_is_not_halted(tmp_path: Path) -> None:
    channel = FileHaltChannel(tmp_path / "halt.json")
    assert isinstance(channel, HaltWaiter)
    assert not await channel.is_halted()
    assert await channel.get_halt_reason() is None
    assert not (tmp_path / "halt.json").exists()  # reading creates nothing


async def test_halt_is_durable_sticky_and_first_reason_wins(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "halt.json"
    channel = FileHaltChannel(path)
    assert await channel.ahalt("storm warning") is True
    assert await channel.ahalt("second reason") is False
    doc = json.loads(path.read_text())
    assert doc["halted"] is True and doc["reason"] == "storm warning"
    assert doc["schema"] == "conclave.halt/1"
    # a restart: a new channel object (or a new process) on the same file
    again = FileHaltChannel(path)
    assert await again.is_halted()
    assert await again.get_halt_reason() == "storm warning"
    assert [r.action for r in again.history] == ["halt"]
    # no temp files left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["halt.json", "halt.json.lock"]


async def test_clear_needs_two_approvers(tmp_path: Path) -> None:
    channel = FileHaltChannel(tmp_path / "halt.json")
    assert channel.halt("x") is True
    with pytest.raises(HaltClearDeniedError):
        await channel.aclear(approvers=["alice"], reason="fixed")
    with pytest.raises(HaltClearDeniedError):
        channel.clear(approvers=["alice", "alice"], reason="fixed")
    assert await channel.is_halted()
    await channel.aclear(approvers=["alice", "bob"], reason="fixed")
    assert not await channel.is_halted()
    history = channel.history
    assert [(r.action, r.approvers) for r in history] == [("halt", ()), ("clear", ("alice", "bob"))]
    assert await channel.ahalt("again") is True
    with pytest.raises(InvalidRequestError):
        await channel.ahalt("")
    with pytest.raises(InvalidRequestError):
        channel.halt("")


async def test_sync_halt_and_clear_like_halt_switch(tmp_path: Path) -> None:
    channel = FileHaltChannel(tmp_path / "halt.json")
    assert channel.halt("sync halt") is True  # written before it returns, like HaltSwitch.halt
    assert await channel.is_halted()
    assert channel.halt("again") is False  # a plain bool, not an awaitable
    assert channel.clear(approvers=["a", "b"], reason="ok") is True  # a plain bool too
    assert not await channel.is_halted()
    assert channel.clear(approvers=["a", "b"], reason="nothing to clear") is False
    assert await channel.ahalt("again") is True
    assert await channel.aclear(approvers=["a", "b"], reason="ok") is True
    assert [r.action for r in channel.history] == ["halt", "clear", "halt", "clear"]


@pytest.mark.parametrize(
    "content", [b"{not json", b"[]", b'{"halted": "yes"}', b'{"halted": true, "reason": 5}', b""]
)
async def test_corrupt_file_counts_as_halted_and_says_so_once(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "halt.json"
    path.write_bytes(content)
    channel = FileHaltChannel(path)
    for _ in range(3):
        assert await channel.is_halted()
    reason = await channel.get_halt_reason()
    assert reason is not None and "corrupt halt file" in reason and "treated as halted" in reason
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # one log line per problem, not one per poll
    # halting over a corrupt file repairs it into a readable halted state
    assert channel.halt("operator confirms")
    assert await channel.get_halt_reason() == "operator confirms"


async def test_unreadable_path_counts_as_halted(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    path.mkdir()  # reading a directory fails, as root too
    assert await FileHaltChannel(path).is_halted()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files regardless of permissions")
async def test_permission_denied_counts_as_halted(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    path.write_text('{"schema": "conclave.halt/1", "halted": false}')
    path.chmod(0)
    assert await FileHaltChannel(path).is_halted()


def test_readers_never_see_a_partial_write(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    writer = FileHaltChannel(path)
    reader = FileHaltChannel(path)
    writer.halt("start")
    stop = threading.Event()
    errors: list[str] = []

    def read_loop() -> None:
        while not stop.is_set():
            state = reader.read_state()
            if state.error is not None:
                errors.append(state.error)

    thread = threading.Thread(target=read_loop)
    thread.start()
    try:
        for i in range(40):
            writer.clear(approvers=("a", "b"), reason=f"clear {i}")
            writer.halt(f"halt {i}")
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert len(reader.history) == 81


HALT_SCRIPT = """
import sys, time, trio
sys.path.insert(0, {root!r})
from adapters.halt.file import FileHaltChannel, HaltFileState
go = float(sys.argv[2])
while time.time() < go:
    pass
print(trio.run(FileHaltChannel(sys.argv[1]).ahalt, sys.argv[3]))
"""


def test_concurrent_halts_from_two_processes(tmp_path: Path) -> None:

    path = tmp_path / "halt.json"
    script = HALT_SCRIPT.format(root=str(ROOT))
    go = str(time.time() + 1.0)  # both start writing at the same instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(path), go, f"process {i}"],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=30)[0].strip() for p in procs]
    assert sorted(outputs) == ["False", "True"]
    winner = outputs.index("True")
    channel = FileHaltChannel(path)
    state = channel.read_state()
    assert state.reason == f"process {winner}"
    assert [r.action for r in state.history] == ["halt"]


async def test_wait_halted_sees_another_writer_without_blocking_trio(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    watcher = FileHaltChannel(path, poll_interval=0.01)
    other = FileHaltChannel(path)
    ticks = 0
    got: list[str] = []
    done = trio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    async def waiter() -> None:
        got.append(await watcher.wait_halted())
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        nursery.start_soon(waiter)
        await trio.sleep(0.05)
        await other.ahalt("from elsewhere")
        await done.wait()
        nursery.cancel_scope.cancel()
    assert got == ["from elsewhere"]
    assert ticks > 100  # the loop kept running while the file was polled


async def test_file_halt_stops_a_running_batch(tmp_path: Path) -> None:
    path = tmp_path / "halt.json"
    dual = DualChannelHaltChecker(HaltSwitch(), FileHaltChannel(path, poll_interval=0.01))
    orch = ScriptedOrchestrator(default=Step(latency=600))
    service = ConcurrentDeliberationService(orch, dual)
    timing: dict[str, float] = {}
    all_in_flight = trio.Event()
    orch.on_start = lambda _agent: all_in_flight.set() if orch.in_flight == 72 else None

    async def halt_by_file() -> None:
        await all_in_flight.wait()
        timing["halt"] = trio.current_time()
        await FileHaltChannel(path).ahalt("file says stop")

    err = await expect_halt(lambda: service.invoke_concurrent(make_requests(72)), halt_by_file)
    assert err.reason == "file says stop"
    assert trio.current_time() - timing["halt"] < 1.0  # a few polls, not the agents' 600 s


# ---------------------------------------------------------------- the lock file


def test_a_new_lock_file_is_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        FileHaltChannel(tmp_path / "halt.json").halt("test")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.lstat(tmp_path / "halt.json.lock").st_mode) == 0o600
    assert stat.S_IMODE(os.lstat(tmp_path / "halt.json").st_mode) == 0o600


@pytest.mark.parametrize("target", ["missing", "file"])
def test_a_symlink_at_the_lock_path_is_never_followed(
    tmp_path: Path, target: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "halt.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    aim = elsewhere / "target"
    if target == "file":
        aim.write_bytes(b"someone else's data")
    before = {p.name: (p.read_bytes(), os.lstat(p)) for p in elsewhere.iterdir()}
    (tmp_path / "halt.json.lock").symlink_to(aim)
    channel = FileHaltChannel(path, lock_timeout=0.01)

    # A halt is never refused: it is written without the lock, and says why.
    with caplog.at_level(logging.ERROR, logger="adapters.halt.file"):
        assert channel.halt("storm") is True
    assert channel.read_state().halted
    assert any("symbolic link" in str(r.__dict__.get("problem")) for r in caplog.records)
    # A clear needs the lock: refused, the halt stands.
    with pytest.raises(HaltClearDeniedError, match="symbolic link"):
        channel.clear(approvers=["a", "b"], reason="all clear")
    assert channel.read_state().halted

    after = {p.name: (p.read_bytes(), os.lstat(p)) for p in elsewhere.iterdir()}
    assert after.keys() == before.keys()  # the target was not created
    for name, (data, st) in before.items():
        assert after[name][0] == data
        assert after[name][1].st_mtime_ns == st.st_mtime_ns
    assert (tmp_path / "halt.json.lock").is_symlink()


async def test_ahistory_reads_the_file_in_a_worker_thread_not_on_the_trio_loop(
    tmp_path: Path,
) -> None:
    readers: list[int] = []

    class Watched(FileHaltChannel):
        def read_state(self) -> HaltFileState:
            readers.append(threading.get_ident())
            return super().read_state()

    channel = Watched(tmp_path / "halt.json")
    await channel.ahalt("recorded")
    readers.clear()
    history = await channel.ahistory()
    assert [(r.action, r.reason) for r in history] == [("halt", "recorded")]
    assert readers and threading.get_ident() not in readers


class HungFileChannel(FileHaltChannel):
    """A halt file on a filesystem that stopped answering (a hard NFS mount, a stuck FUSE
    daemon): its reads block until ``gate`` opens."""

    def __init__(self, path: Path, gate: threading.Event) -> None:
        super().__init__(path)
        self.gate = gate

    def _read_bytes(self) -> bytes | None:
        self.gate.wait()
        return super()._read_bytes()


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Opened by the test's end at the latest; a safety net, not a synchronisation."""
    event = threading.Event()
    timer = threading.Timer(30.0, event.set)
    timer.start()
    yield event
    event.set()
    timer.cancel()


async def test_a_hung_halt_file_read_is_bounded_by_the_read_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, gate: threading.Event
) -> None:
    """Guards against: the read ran in a worker thread trio could not abandon, so
    ``halt_read_timeout`` could not end it: the batch waited for the filesystem (then ran, the file
    being clear), and so did a dual checker however fast its other channel answered."""
    orchestrator = ScriptedOrchestrator()
    service = ConcurrentDeliberationService(
        orchestrator, HungFileChannel(tmp_path / "halt.json", gate), halt_read_timeout=0.5
    )
    with pytest.raises(SystemHaltedError, match=r"did not answer within 0\.5 s"):
        await service.invoke_concurrent(make_requests(2))
    assert not gate.is_set() and orchestrator.invoked == []

    dual = DualChannelHaltChecker(
        HaltSwitch(), HungFileChannel(tmp_path / "halt.json", gate), read_timeout=0.5
    )
    assert await dual.is_halted()
    assert not gate.is_set()


# --------------------------------------------------- fail-closed: every corrupt shape reads halted


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
    before = snapshot(path)
    with pytest.raises(HaltClearDeniedError, match=r"unreadable.*conclave halt"):
        channel.clear(approvers=["alice", "bob"], reason="looks fine to me")
    with pytest.raises(HaltClearDeniedError):
        await channel.aclear(approvers=["alice", "bob"], reason="looks fine to me")
    assert snapshot(path) == before

    # Halting rewrites it into a readable halted file and keeps the old entry aside.
    assert channel.halt("operator confirms") is True
    good = channel.read_state()
    assert good == HaltFileState(True, "operator confirms", good.history, None, good.halt_id)
    assert good.halt_id is not None and good.history[-1].halt_id == good.halt_id
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
            now = channel.read_state()
            assert now == HaltFileState(True, "fuzz", now.history, None, now.halt_id)
        else:  # a well-formed document is read as it says, never as corrupt
            assert state.error is None
            assert state.halted == (expected == "halted")
            assert state.halted or state.reason is None
        for record in state.history:
            assert record.action in ("halt", "clear") and isinstance(record.reason, str)
            assert record.at.tzinfo is not None
            assert all(isinstance(a, str) for a in record.approvers)


# ---------------------------------------------------------------- the CLI on a corrupt file


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


# ---------------------------------------------------------------- signed approvals


@pytest.fixture
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keyring:
    ring = Keyring(tmp_path_factory.mktemp("keys"))
    ring.trust("alice")
    ring.trust("bob")
    return ring


def signed_channel(path: Path, keys: Keyring, **kwargs: Any) -> FileHaltChannel:
    return FileHaltChannel(path, allowed_signers=keys.allowed, revoked=keys.revoked, **kwargs)


async def test_two_signed_approvals_for_the_current_halt_clear_it_and_the_history_says_who(
    tmp_path: Path, keys: Keyring
) -> None:
    channel = signed_channel(tmp_path / "halt.json", keys)
    await channel.ahalt("tool misuse")
    state = await channel.state()
    assert state.halt_id is not None
    approvals = [keys.approve(p, state.halt_id, "tool misuse") for p in ("alice", "bob")]
    assert await channel.aclear(approvals=approvals, reason="fixed the tool") is True
    assert not await channel.is_halted()
    record = (await channel.ahistory())[-1]
    assert (record.action, record.reason, record.halt_id) == (
        "clear",
        "fixed the tool",
        state.halt_id,
    )
    assert record.approvers == ("alice", "bob")
    assert record.fingerprints == (keys.fingerprint("alice"), keys.fingerprint("bob"))


async def test_one_valid_and_one_forged_approval_change_nothing(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    await channel.ahalt("tool misuse")
    halt_id = (await channel.state()).halt_id
    before = snapshot(path)
    good = keys.approve("alice", halt_id, "tool misuse")
    forgeries = {
        "bob's name, mallory's key": keys.approve("bob", halt_id, "tool misuse", key_of="mallory"),
        "bob's name, alice's key": keys.approve("bob", halt_id, "tool misuse", key_of="alice"),
        "bob's approval of another halt, edited": keys.tamper(
            keys.approve("bob", "0" * 32, "tool misuse"), "0" * 32, str(halt_id)
        ),
    }
    for forged in forgeries.values():
        with pytest.raises(ApprovalRefusedError, match="'bob' refused"):
            await channel.aclear(approvals=[good, forged], reason="trust me")
        with pytest.raises(ApprovalRefusedError):
            channel.clear(approvals=[forged, good], reason="trust me")
        assert snapshot(path) == before


async def test_a_channel_with_allowed_signers_refuses_names_and_changes_nothing(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    await channel.ahalt("tool misuse")
    before = snapshot(path)
    with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
        await channel.aclear(approvers=["alice", "bob"], reason="typed names")
    with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
        channel.clear(approvers=["alice", "bob"], reason="typed names")
    assert snapshot(path) == before
    plain = FileHaltChannel(path)
    with pytest.raises(HaltClearDeniedError, match="no allowed-signers file"):
        await plain.aclear(approvals=["x", "y"], reason="r")


async def test_a_file_written_with_allowed_signers_refuses_names_from_every_channel(
    tmp_path: Path, keys: Keyring
) -> None:
    """One operator must not clear alone by leaving out --allowed-signers: once a tool
    with an allowed-signers file has written the file, a channel without one refuses
    names too, and its own halts and clears keep the file that way."""
    path = tmp_path / "halt.json"
    await signed_channel(path, keys).ahalt("tool misuse")
    plain = FileHaltChannel(path)
    before = snapshot(path)
    with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
        await plain.aclear(approvers=["alice", "bob"], reason="alone")
    with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
        plain.clear(approvers=["alice", "bob"], reason="alone")
    assert snapshot(path) == before and plain.read_state().halted

    signed = signed_channel(path, keys)
    halt_id = (await signed.state()).halt_id
    approvals = [keys.approve(p, halt_id, "tool misuse") for p in ("alice", "bob")]
    assert await signed.aclear(approvals=approvals, reason="fixed")
    # A halt raised without allowed signers keeps the rule for its clear.
    assert await plain.ahalt("again")
    with pytest.raises(HaltClearDeniedError, match="requires signed approvals"):
        await plain.aclear(approvers=["alice", "bob"], reason="alone")
    # A file no tool with allowed signers wrote is cleared by names, as before.
    other = FileHaltChannel(tmp_path / "other.json")
    await other.ahalt("storm")
    assert await other.aclear(approvers=["alice", "bob"], reason="calm")


async def test_an_approval_for_an_earlier_halt_cannot_clear_a_new_one(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    await channel.ahalt("storm")
    first = (await channel.state()).halt_id
    old = [keys.approve(p, first, "storm") for p in ("alice", "bob")]
    await channel.aclear(approvals=old, reason="calm")
    await channel.ahalt("storm")  # the same reason, a new halt
    assert (await channel.state()).halt_id != first
    before = snapshot(path)
    with pytest.raises(ApprovalRefusedError, match="is for another halt"):
        await channel.aclear(approvals=old, reason="calm again")
    assert snapshot(path) == before


class _DuringVerification(SignatureVerifier):
    """Verifies for real, then runs ``meanwhile`` (another process's write) once."""

    def __init__(self, keys: Keyring, meanwhile: Any) -> None:
        super().__init__(keys.allowed, keys.revoked)
        self.meanwhile = meanwhile

    def verify(self, signed: SignedStatement) -> Any:
        signer = super().verify(signed)
        if self.meanwhile is not None:
            meanwhile, self.meanwhile = self.meanwhile, None
            meanwhile()
        return signer


async def test_a_new_halt_raised_while_approvals_are_verified_is_not_cleared(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    await channel.ahalt("storm")
    halt_id = (await channel.state()).halt_id
    approvals = [keys.approve(p, halt_id, "storm") for p in ("alice", "bob")]
    other = signed_channel(path, keys)

    def new_halt() -> None:
        # Someone cleared with their own approvals and a new halt came at once.
        other.clear(approvals=approvals, reason="elsewhere")
        other.halt("a second storm")

    channel.verifier = _DuringVerification(keys, new_halt)
    with pytest.raises(ApprovalRefusedError, match="is for another halt"):
        await channel.aclear(approvals=approvals, reason="calm")
    assert await channel.get_halt_reason() == "a second storm"


async def test_a_halt_file_made_unreadable_during_verification_is_not_cleared(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    await channel.ahalt("storm")
    halt_id = (await channel.state()).halt_id
    approvals = [keys.approve(p, halt_id, "storm") for p in ("alice", "bob")]
    channel.verifier = _DuringVerification(keys, lambda: path.write_text('{"halted": fal'))
    with pytest.raises(HaltClearDeniedError, match="unreadable"):
        await channel.aclear(approvals=approvals, reason="calm")
    assert path.read_text() == '{"halted": fal'


async def test_a_signed_halt_says_who_halted_and_a_bad_signature_writes_nothing(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    forged = keys.approve("alice", None, "storm", action="halt", key_of="mallory")
    with pytest.raises(InvalidRequestError, match="nothing was written"):
        await channel.ahalt("storm", signed=forged)
    assert not path.exists()
    signed = keys.approve("alice", None, "storm", action="halt")
    assert await channel.ahalt("storm", signed=signed) is True
    record = (await channel.ahistory())[-1]
    assert (record.action, record.approvers) == ("halt", ("alice",))
    assert record.fingerprints == (keys.fingerprint("alice"),)
    assert record.halt_id == (await channel.state()).halt_id
    # Unsigned halts stay open to everyone.
    await channel.aclear(
        approvals=[keys.approve(p, record.halt_id, "storm") for p in ("alice", "bob")],
        reason="calm",
    )
    assert FileHaltChannel(path).halt("anyone may halt") is True


# ---------------------------------------------------------------- file permissions

_AS_WORKER = """
import json, os, sys
from adapters.halt.file import FileHaltChannel
from kernel import HaltClearDeniedError

if os.geteuid() == 0:  # root reads and writes everything: become a worker's user first
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
channel = FileHaltChannel(sys.argv[1], lock_timeout=0.5)
state = channel.read_state()
seen = {"halted": state.halted, "reason": state.reason, "error": state.error}
try:
    channel.clear(approvers=["alice", "bob"], reason="a worker's forgery")
    seen["clear"] = "cleared"
except HaltClearDeniedError as exc:
    seen["clear"] = str(exc)
for name, forge in {
    "write": lambda: open(sys.argv[1], "w").write("{}"),
    "replace": lambda: open(sys.argv[1] + ".new", "w"),
    "remove": lambda: os.unlink(sys.argv[1]),
}.items():
    try:
        forge()
        seen[name] = "done"
    except OSError as exc:
        seen[name] = exc.strerror
print(json.dumps(seen))
"""


def test_a_worker_without_write_permission_reads_the_halt_but_cannot_clear_or_rewrite_it() -> None:
    # Operators own the directory and the file (0755 / 0644); workers run as another
    # user.  As root (here), the child drops to nobody; as anyone else, the directory
    # and file are made read-only to ourselves, which is the same test.
    directory = Path(tempfile.mkdtemp(prefix="conclave-perm-"))
    try:
        path = directory / "halt.json"
        FileHaltChannel(path).halt("operator halt")
        (directory / "halt.json.lock").unlink()
        before = snapshot(path)
        directory.chmod(0o755 if os.geteuid() == 0 else 0o555)
        path.chmod(0o644 if os.geteuid() == 0 else 0o444)
        proc = subprocess.run(
            [sys.executable, "-c", _AS_WORKER, str(path)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        seen = json.loads(proc.stdout)
        assert seen["halted"] and seen["reason"] == "operator halt" and seen["error"] is None
        assert "Permission denied" in seen["clear"]
        # Nor by writing the file itself, replacing it, or removing it.
        assert [seen[k] for k in ("write", "replace", "remove")] == ["Permission denied"] * 3
        assert snapshot(path) == before
    finally:
        directory.chmod(0o755)
        shutil.rmtree(directory, ignore_errors=True)


async def test_a_signed_halt_stops_a_running_batch_and_only_a_signed_clear_resumes_the_service(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    watched = signed_channel(path, keys, poll_interval=0.01)
    service = ConcurrentDeliberationService(
        ScriptedOrchestrator(default=Step(latency=600)),
        DualChannelHaltChecker(HaltSwitch(), watched),
    )
    operator = signed_channel(path, keys)
    signed = keys.approve("alice", None, "council off the rails", action="halt")

    async def signed_halt() -> None:
        await trio.sleep(1)
        await operator.ahalt("council off the rails", signed=signed)

    err = await expect_halt(lambda: service.invoke_concurrent(make_requests(8)), signed_halt)
    assert err.reason == "council off the rails"
    halt_id = (await operator.state()).halt_id
    good = keys.approve("alice", halt_id, "council off the rails")
    forged = keys.approve("bob", halt_id, "council off the rails", key_of="mallory")
    with pytest.raises(ApprovalRefusedError):
        await operator.aclear(approvals=[good, forged], reason="resume")
    with pytest.raises(SystemHaltedError):
        await service.invoke_concurrent(make_requests(2))
    bob = keys.approve("bob", halt_id, "council off the rails")
    assert await operator.aclear(approvals=[good, bob], reason="resume") is True
    quick = ConcurrentDeliberationService(ScriptedOrchestrator(), service.halt_checker)
    result = await quick.invoke_concurrent(make_requests(2))
    assert result.success_count == 2


async def test_approvals_verified_while_the_file_is_rewritten_clear_only_the_halt_they_name(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    channel = signed_channel(path, keys)
    await channel.ahalt("storm")
    first = (await channel.state()).halt_id
    approvals = [keys.approve(p, first, "storm") for p in ("alice", "bob")]
    stop = threading.Event()

    keys.trust("carol")
    keys.trust("dave")

    def rewrite() -> None:
        # Other operators' tools, busy: clear (with their own approvals) and re-halt.
        other = signed_channel(path, keys)
        while not stop.is_set():
            halt_id = other.read_state().halt_id
            if halt_id is not None:
                theirs = [keys.approve(p, halt_id, "storm") for p in ("carol", "dave")]
                with contextlib.suppress(ApprovalRefusedError):  # cleared meanwhile
                    other.clear(approvals=theirs, reason="churn")
            other.halt("storm")
            stop.wait(0.002)  # let the clear under test take the lock now and then

    outcomes: list[bool | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.to_thread.run_sync, rewrite)
        for _ in range(5):
            try:
                outcomes.append(await channel.aclear(approvals=approvals, reason="calm"))
            except ApprovalRefusedError as exc:
                assert "is for another halt" in str(exc)
                outcomes.append(None)
        stop.set()
    history = await channel.ahistory()
    signed_clears = [r for r in history if r.approvers == ("alice", "bob")]
    # Whatever the interleaving: a signed clear only ever cleared the halt it named.
    assert all(r.halt_id == first for r in signed_clears)
    assert len(signed_clears) <= 1 and outcomes.count(True) == len(signed_clears)


async def test_approvals_checked_against_other_signer_files_than_the_file_records_change_nothing(
    tmp_path: Path, keys: Keyring
) -> None:
    """One operator must not clear alone with an allowed-signers file of their own
    (listing two keys they hold), nor by leaving out the revocation list."""
    path = tmp_path / "halt.json"
    signed = signed_channel(path, keys)
    await signed.ahalt("tool misuse")
    halt_id = (await signed.state()).halt_id
    own = tmp_path / "my_allowed_signers"
    for name, key in (("alice", "mallory"), ("bob", "mallory-2")):
        public = keys.key(key).with_suffix(".pub").read_text().split()[:2]
        with own.open("a") as f:
            f.write(f"{name} {' '.join(public)}\n")
    forged = [
        keys.approve("alice", halt_id, "tool misuse", key_of="mallory"),
        keys.approve("bob", halt_id, "tool misuse", key_of="mallory-2"),
    ]
    before = snapshot(path)
    mine = FileHaltChannel(path, allowed_signers=own)
    with pytest.raises(ApprovalRefusedError, match=r"verifies signatures against .*, not "):
        await mine.aclear(approvals=forged, reason="alone")
    assert snapshot(path) == before
    real = [keys.approve(p, halt_id, "tool misuse") for p in ("alice", "bob")]
    assert await signed.aclear(approvals=real, reason="fixed")

    # Nor is a signed halt recorded as someone's against other files (nothing written).
    before = snapshot(path)
    fake = keys.approve("alice", None, "storm", action="halt", key_of="mallory")
    with pytest.raises(InvalidRequestError, match=r"verifies signatures against .*nothing was"):
        await mine.ahalt("storm", signed=fake)
    assert snapshot(path) == before

    await signed.ahalt("storm")
    halt_id = (await signed.state()).halt_id
    keys.revoke("bob")  # bob's key was stolen
    real = [keys.approve(p, halt_id, "storm") for p in ("alice", "bob")]
    before = snapshot(path)
    unrevoked = FileHaltChannel(path, allowed_signers=keys.allowed)
    with pytest.raises(ApprovalRefusedError, match="with revocation list"):
        await unrevoked.aclear(approvals=real, reason="with the stolen key")
    assert snapshot(path) == before


async def test_a_revocation_list_can_be_added_to_the_recorded_signer_files_never_dropped(
    tmp_path: Path, keys: Keyring
) -> None:
    path = tmp_path / "halt.json"
    await FileHaltChannel(path, allowed_signers=keys.allowed).ahalt("storm")
    halt_id = (await FileHaltChannel(path).state()).halt_id
    approvals = [keys.approve(p, halt_id, "storm") for p in ("alice", "bob")]
    assert await signed_channel(path, keys).aclear(approvals=approvals, reason="calm")
    recorded = FileHaltChannel(path).read_state().signed_clears
    assert recorded is not None and recorded.revoked == str(keys.revoked)
    await FileHaltChannel(path).ahalt("again")
    halt_id = (await FileHaltChannel(path).state()).halt_id
    approvals = [keys.approve(p, halt_id, "again") for p in ("alice", "bob")]
    with pytest.raises(ApprovalRefusedError, match="with revocation list"):
        await FileHaltChannel(path, allowed_signers=keys.allowed).aclear(
            approvals=approvals, reason="without it"
        )
