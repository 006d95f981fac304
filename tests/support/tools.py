"""System binaries some tests need (promtool, the Pushgateway): found on PATH, or the test
is skipped on a developer's machine and FAILS in CI (``CI`` or ``CONCLAVE_REQUIRE_TOOLS``
set), where a skipped check would be a check that silently never ran."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

__all__ = ["require_tool", "tools_required"]


def tools_required() -> bool:
    """True in CI: a missing tool fails the test instead of skipping it."""
    return any(
        os.environ.get(name) not in (None, "", "0") for name in ("CI", "CONCLAVE_REQUIRE_TOOLS")
    )


def require_tool(name: str, debian_package: str) -> Path:
    """The path of ``name`` on PATH; else skip (locally) or fail (in CI) naming the package."""
    found = shutil.which(name)
    if found is not None:
        return Path(found)
    message = f"{name} not on PATH: apt-get install {debian_package}"
    if tools_required():
        pytest.fail(message + " (required in CI)")
    pytest.skip(message)
