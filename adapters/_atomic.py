"""Write a file so that no reader, crash or Ctrl-C ever sees it half-written."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path

__all__ = ["write_atomically"]


def write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename it over ``path``,
    and fsync the directory so the rename itself is durable.  On any error the temp
    file is removed and ``path`` is untouched.

    A ``path`` that is there and is not a regular file (``/dev/null``, ``/dev/stdout``, a
    named pipe; through a link too) is written into: renaming over it would put a
    regular file in the device's place, and atomicity means nothing there."""
    try:
        mode: int | None = os.stat(path).st_mode
    except OSError:  # not there (or not reachable): the usual way, which says why
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with open(path, "wb") as f:  # its errors (ENOSPC from /dev/full) are raised
            f.write(data)
        return
    directory = path.parent
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
