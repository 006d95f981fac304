"""The README's Python snippets run, as a reader would paste them.

Each ```python block runs: whole programs as they are; fragments (a top-level ``await``)
inside one async function, with the names the prose says they come from (``service``,
``requests``, ``orchestrator``, ``url``, ``base_url``, ``model``) made from the stub and the
test's servers; asyncio programs (``asyncio.run``) in an interpreter of their own.
Addresses and paths the README writes for a reader's machine are swapped for the test's
(the loopback LLM server, a temporary directory): :data:`SWAPS`.  A block that needs what
the main environment cannot have says so in a comment the reader sees too
(``<!-- snippet: skip REASON -->`` just before it), and is listed here as skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.support import ROOT
from tests.support.fake_openai import FakeOpenAIServer
from tests.support.valkey_server import ValkeyServer

README = (ROOT / "README.md").read_text(encoding="utf-8")
_BLOCK = re.compile(r"(?:<!-- snippet: skip ([^>]*?) -->\n)?```python\n(.*?)```", re.S)
BLOCKS = [(m[2], m[1]) for m in _BLOCK.finditer(README)]

#: A reader's addresses and paths -> the test's (formatted with the fixtures' values).
SWAPS = {
    "http://127.0.0.1:11434/v1": "{llm}",
    "http://127.0.0.1:8080/v1": "{llm}",
    '"/var/run/conclave/halt.json"': '"{tmp}/halt.json"',
    '"examples/': f'"{ROOT}/examples/',
    "serve_metrics(9464)": "serve_metrics(0)",
}

_PRELUDE = """
from adapters.stub import AgentOrchestratorStub
from adapters.roster import Roster
from kernel import (AgentPool, ConcurrentDeliberationService, ContextBundle,
                    DualChannelHaltChecker, HaltSwitch)
orchestrator = AgentOrchestratorStub(latency_ms=5)
service = ConcurrentDeliberationService(AgentOrchestratorStub(latency_ms=5), HaltSwitch())
requests = Roster.default(72).requests(ContextBundle("motion-7", "Adopt the budget?"))
"""


def _title(code: str) -> str:
    return code.strip().splitlines()[0][:50]


def test_the_readme_has_snippets_to_run() -> None:
    assert len(BLOCKS) >= 5


@pytest.fixture
def in_tmp(tmp_path: Path, llm_server: FakeOpenAIServer) -> Iterator[Path]:
    """A directory of the test's, with the README's own roster example as council.toml
    (its second agent's endpoint the loopback server)."""
    before = Path.cwd()
    os.chdir(tmp_path)
    roster = re.search(r"```toml\n(.*?)```", README, re.S)
    assert roster is not None
    text = roster[1].replace("https://api.openai.com/v1", llm_server.base_url)
    (tmp_path / "council.toml").write_text(text)
    try:
        yield tmp_path
    finally:
        os.chdir(before)


@pytest.mark.parametrize(("code", "skip"), BLOCKS, ids=[_title(c) for c, _ in BLOCKS])
def test_a_readme_snippet_runs(
    code: str,
    skip: str | None,
    in_tmp: Path,
    llm_server: FakeOpenAIServer,
    valkey_server: ValkeyServer,
) -> None:
    if skip:
        pytest.skip(skip)
    for reader, ours in SWAPS.items():
        code = code.replace(reader, ours.format(llm=llm_server.base_url, tmp=in_tmp))
    if "asyncio.run(" in code:
        # An asyncio program: its own interpreter, as an application is (this one runs
        # trio-asyncio as a pytest plugin, which makes asyncio.run build its loops).
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return
    namespace: dict[str, Any] = {
        "__name__": "readme_snippet",
        "url": valkey_server.url,
        "base_url": llm_server.base_url,
        "model": "fake-model",
    }
    if re.search(r"^(?:async with|await |result = await)", code, re.M) or "\nawait " in code:
        body = textwrap.indent(code, "    ")
        program = f"{_PRELUDE}\nasync def _snippet():\n{body}\n    return locals()\n"
        exec(compile(program, "README.md", "exec"), namespace)
        namespace.update(trio.run(namespace["_snippet"]))
    else:
        exec(compile(code, "README.md", "exec"), namespace)
