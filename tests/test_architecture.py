"""The kernel's dependency rule: trio, attrs and the standard library, nothing else."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

KERNEL = Path(__file__).parent.parent / "kernel"
ALLOWED = {"trio", "attrs", "kernel"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_kernel_imports_only_trio_attrs_and_stdlib() -> None:
    for path in sorted(KERNEL.glob("*.py")):
        for module in _imports(path) - ALLOWED:
            assert module in sys.stdlib_module_names, f"{path.name} imports {module}"
            assert module not in {"asyncio", "argparse", "http", "urllib", "socket"}, (
                f"{path.name} imports {module}: the kernel knows no asyncio, HTTP or CLI"
            )


def test_importing_kernel_loads_no_adapter_or_client_library() -> None:
    code = "import json, sys, kernel; print(json.dumps(sorted(sys.modules)))"
    loaded = json.loads(subprocess.check_output([sys.executable, "-c", code], text=True))
    roots = {name.split(".")[0] for name in loaded}
    assert not roots & {"adapters", "openai", "trio_asyncio", "httpx", "httpx2", "rich", "asyncio"}


def test_public_names_are_importable_from_kernel() -> None:
    import kernel

    for name in kernel.__all__:
        assert hasattr(kernel, name), name
    assert kernel.MAX_CONCURRENT_AGENTS == 72
