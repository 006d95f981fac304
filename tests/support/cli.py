"""The ``conclave`` command as a user runs it: a subprocess in the repository root."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.support import ROOT

CONCLAVE = [sys.executable, "-m", "adapters.cli"]


def conclave(
    *args: str, timeout: float = 60, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``conclave *args`` to the end (``env``: the whole environment, if given)."""
    return subprocess.run(
        [*CONCLAVE, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


@contextlib.contextmanager
def deliberating(*args: str) -> Iterator[subprocess.Popen[str]]:
    """``conclave deliberate *args``, once it says it is deliberating.  Inside the block,
    ``proc.communicate()`` collects its output; on the way out it is killed, whatever
    happened."""
    with subprocess.Popen(
        [*CONCLAVE, "deliberate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as proc:
        try:
            assert proc.stderr is not None
            line = proc.stderr.readline()
            assert "deliberating with" in line, line
            yield proc
        finally:
            proc.kill()


def halt_from_cli(halt_file: Path, reason: str) -> None:
    """``conclave halt`` from another process; it must succeed."""
    proc = conclave("halt", "--halt-file", str(halt_file), "--reason", reason)
    assert proc.returncode == 0, proc.stderr


def conclave_without(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``conclave *args`` in an interpreter where ``module`` cannot be imported, as in a
    wheel installed without the extra that brings it (``None`` in ``sys.modules``: both
    ``import`` and ``importlib.util.find_spec`` say it is not there)."""
    code = (
        f"import sys; sys.modules[{module!r}] = None; "
        "from adapters.cli.commands import main; sys.exit(main())"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def announced_batch(proc: subprocess.Popen[str]) -> str:
    """The batch id a deliberation with a witness log says on stderr as its run starts
    (read after :func:`deliberating`'s first line)."""
    assert proc.stderr is not None
    seen = []
    for _ in range(10):  # notes may come first (e.g. an endpoint that lists no models)
        line = proc.stderr.readline()
        if line.startswith("conclave: batch "):
            return line.split()[2]
        seen.append(line)
    raise AssertionError(f"no batch id announced: {seen}")
