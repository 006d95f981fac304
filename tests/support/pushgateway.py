"""A real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``) on a free 127.0.0.1
port, keeping nothing on disk; and a gateway that hangs (accepts connections, never
answers), for the bounded-push tests."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from tests.support.tools import require_tool
from tests.support.valkey_server import free_port

__all__ = ["hanging_gateway", "pushgateway", "scrape"]


def scrape(url: str) -> str:
    """The gateway's ``/metrics`` text."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text: str = response.read().decode()
        return text


@contextmanager
def pushgateway() -> Iterator[str]:
    """A running gateway's base URL (``http://127.0.0.1:PORT``), stopped on the way out."""
    binary = require_tool("prometheus-pushgateway", "prometheus-pushgateway")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(binary), f"--web.listen-address=127.0.0.1:{port}", "--persistence.file="],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # readiness, not a sleep: poll until it answers or has died
            try:
                with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    err = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"pushgateway did not start: {err}") from None
                time.sleep(0.05)
        yield url
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


@contextmanager
def hanging_gateway() -> Iterator[str]:
    """A URL whose server takes the connection (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
