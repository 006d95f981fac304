"""The CrewAI tests' ground rules: real crewai or a loud failure, and no network but 127.0.0.1.

These tests run in .venv-crewai (``make test``).  Without crewai they fail at collection
instead of being skipped: a green run must always mean real crewai ran.

Nothing leaves the machine: an audit hook refuses every connection and name lookup that
is not for a loopback address (CrewAI's telemetry, its tracing, a version check), and
records it; a test during which anything tried fails, naming what was tried.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

if importlib.util.find_spec("crewai") is None:
    raise RuntimeError(
        "tests/adapters/llm/crewai needs crewai: run them with `make test` (it builds "
        ".venv-crewai), or install the project's crewai extra"
    )

#: Off-machine network attempts (event, target), refused by the audit hook.
OFF_MACHINE: list[tuple[str, str]] = []


def _is_local(host: object) -> bool:
    if host is None or host in ("", b"", "localhost", b"localhost"):
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    if not isinstance(host, str):
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return host.endswith(".localhost")


def _guard(event: str, args: tuple[Any, ...]) -> None:
    if event == "socket.getaddrinfo":
        host = args[0]
    elif event == "socket.connect":
        address = args[1]
        if not isinstance(address, tuple):  # AF_UNIX: a path
            return
        host = address[0]
    else:
        return
    if not _is_local(host):
        OFF_MACHINE.append((event, repr(host)))
        raise OSError(f"tests/adapters/llm/crewai: off-machine network refused ({event} {host!r})")


sys.addaudithook(_guard)


@pytest.fixture(autouse=True)
def _nothing_leaves_the_machine() -> Iterator[None]:
    before = len(OFF_MACHINE)
    yield
    tried = OFF_MACHINE[before:]
    assert not tried, f"something tried to reach beyond 127.0.0.1: {tried}"


# ------------------------------------------------------------------ threads

#: Packages whose code, running in a thread other than the main one, means an LLM call
#: (or CrewAI's agent loop) is running in a worker thread.
LLM_PACKAGES = frozenset({"crewai", "crewai_core", "openai", "httpx", "httpcore"})


def _packages(frame: FrameType | None) -> set[str]:
    found: set[str] = set()
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if isinstance(module, str):
            found.add(module.split(".")[0])
        frame = frame.f_back
    return found


def threads_running_llm_code() -> list[str]:
    """Names of the threads, other than the main (trio) one, inside crewai/openai/httpx code.

    Idle worker threads (trio's thread cache, asyncio's executor) wait in threading and
    queue code, not in these packages; a thread blocked in a synchronous HTTP request is
    inside httpx/httpcore (under openai, under crewai).
    """
    names = {t.ident: t.name for t in threading.enumerate()}
    main = threading.main_thread().ident
    return sorted(
        names.get(ident, str(ident))
        for ident, frame in sys._current_frames().items()
        if ident != main and _packages(frame) & LLM_PACKAGES
    )
