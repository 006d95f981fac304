"""The processes some scenarios measure through: the loopback OpenAI-compatible server and
the loop-stall probe, each in an interpreter of its own started from the repository root."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "fake_server", "loop_stall_probe", "otlp_collector"]

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def fake_server(*args: str) -> Iterator[str]:
    """The loopback server (tests/support/fake_openai.py, ``args`` are its options) for the
    duration of the block; yields its base URL.

    A process of its own so that it does not compete with the client for the GIL (in the
    tests it is a thread).
    """
    with _serving("tests.support.fake_openai", *args) as port:
        yield f"http://127.0.0.1:{port}/v1"


@contextmanager
def otlp_collector() -> Iterator[str]:
    """A loopback OTLP/HTTP collector (tests/support/otlp_collector.py) in a process of
    its own for the duration of the block; yields its traces endpoint."""
    with _serving("tests.support.otlp_collector") as port:
        yield f"http://127.0.0.1:{port}/v1/traces"


@contextmanager
def _serving(module: str, *args: str) -> Iterator[int]:
    """``python -m module *args``, which prints its port, until the block ends."""
    proc = subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()


def loop_stall_probe(*args: str) -> dict[str, Any]:
    """One run of tests/support/loop_stall_probe.py in a fresh interpreter: its JSON report."""
    out = subprocess.run(
        [sys.executable, "-m", "tests.support.loop_stall_probe", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report: dict[str, Any] = json.loads(out)
    return report
