"""write_atomically: a reader sees the old file or the new one, never half of either; a
failed write leaves the old file and nothing beside it."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from adapters._atomic import write_atomically


def test_the_new_content_replaces_the_old_and_nothing_is_left_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")
    write_atomically(path, b"new")
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(b"old")

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["state.json"]


def test_a_directory_that_does_not_exist_is_an_error_and_creates_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_atomically(tmp_path / "missing" / "state.json", b"new")
    assert os.listdir(tmp_path) == []


def test_a_path_that_is_not_a_regular_file_is_written_into_not_replaced(tmp_path: Path) -> None:
    # `--json /dev/null`, `--out /dev/stdout`, a named pipe: the rename put a regular file
    # in the device's or pipe's place (as root, /dev/null itself).  A FIFO stands in for
    # a device here; a link to it for /dev/stdout.
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"
    link.symlink_to(fifo)
    for path in (fifo, link):
        received: list[bytes] = []
        reader = threading.Thread(target=lambda got=received: got.append(fifo.read_bytes()))
        reader.start()
        try:
            write_atomically(path, b"report")
        finally:
            if reader.is_alive():  # unblock the reader if nothing opened the pipe
                with open(fifo, "wb"):
                    pass
            reader.join(10)
        assert received == [b"report"], path
        assert stat.S_ISFIFO(fifo.stat().st_mode) and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "stdout"]
