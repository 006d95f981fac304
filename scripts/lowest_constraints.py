"""Print ``name==floor`` for every direct dependency of the runtime extras in
pyproject.toml: the oldest combination the project claims to support, for
``make test-lowest`` (pip has no "lowest" resolution of its own).

Only ``>=`` floors are read; a dependency without one is left to the resolver.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

#: The extras an application installs (not the test, lint or benchmark tools).
RUNTIME_EXTRAS = ("llm", "valkey", "metrics", "cli")

_FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*[^;]*?>=\s*([^,;\s]+)")


def floors(pyproject: Path) -> dict[str, str]:
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted = list(project["dependencies"])
    for extra in RUNTIME_EXTRAS:
        wanted += project.get("optional-dependencies", {}).get(extra, [])
    found: dict[str, str] = {}
    for spec in wanted:
        match = _FLOOR.match(spec)
        if match and not match[1].startswith("conclave-kernel"):
            found[match[1].lower()] = match[2]
    return found


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    for name, floor in sorted(floors(root / "pyproject.toml").items()):
        print(f"{name}=={floor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
