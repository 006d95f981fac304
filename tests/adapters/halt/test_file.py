"""FileHaltChannel: durable, atomic, sticky, fail-safe, cross-process."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from adapters.halt.file import FileHaltChannel, HaltFileState
from kernel import (
    ConcurrentDeliberationService,
    DualChannelHaltChecker,
    HaltClearDeniedError,
    HaltSwitch,
    HaltWaiter,
    InvalidRequestError,
)
from tests.support import ROOT
from tests.support.helpers import ScriptedOrchestrator, Step, expect_halt, make_requests


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
    import time

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
