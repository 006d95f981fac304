"""The layout's rules: the kernel depends on trio, attrs and the standard library only;
adapters use its public names; every module has its test module where tests/ mirrors the
code; old import paths are only kept, never used."""

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


ROOT = KERNEL.parent


def _private_kernel_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [
            n
            for n in names
            if n.startswith("kernel.") and "._" in n and not n.endswith("__")  # __version__
        ]
    return found


def test_adapters_and_benchmarks_use_only_the_public_kernel() -> None:
    for folder in ("adapters", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            assert _private_kernel_imports(path) == [], f"{path} reaches into kernel internals"


def test_no_kernel_module_touches_another_objects_private_names() -> None:
    """Each object's underscore names belong to its own module (``self._x`` only)."""
    for path in sorted(KERNEL.glob("*.py")):
        if path.name == "_pool.py":  # AgentPool and its Admission are one concept
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (
                    isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "other")
                )
                and node.attr != "_create"  # trio.Cancelled._create: trio's own API
            ):
                raise AssertionError(f"{path.name}:{node.lineno} touches .{node.attr}")


def test_kernel_modules_import_each_other_without_cycles() -> None:
    """Including imports under TYPE_CHECKING: the kernel's modules form a tree."""
    graph: dict[str, set[str]] = {}
    for path in KERNEL.glob("*.py"):
        name = "kernel" if path.stem == "__init__" else f"kernel.{path.stem}"
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("kernel")
            ):
                deps.add(node.module)
        graph[name] = deps - {name}
    done: set[str] = set()

    def visit(module: str, trail: tuple[str, ...]) -> None:
        assert module not in trail, f"import cycle: {' -> '.join((*trail, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*trail, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def _docstrings(tree: ast.Module) -> list[tuple[int, str]]:
    owners = [tree] + [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
    ]
    found = []
    for owner in owners:
        body = owner.body
        first = body[0] if body else None
        value = first.value if isinstance(first, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            found.append((value.lineno, value.value))
    return found


def test_every_docstring_is_encodable_utf8_so_python_3_13_can_compile_it() -> None:
    # Python 3.13 cleans docstrings at compile time through UTF-8: a lone surrogate
    # escape (a non-raw "\ud800") in one makes the whole module fail to import there,
    # while 3.11 and 3.12 import it fine.
    packages = ("kernel", "adapters", "tests", "benchmarks")
    sources = [path for package in packages for path in (ROOT / package).rglob("*.py")]
    for path in sorted(sources):
        for line, doc in _docstrings(ast.parse(path.read_text())):
            try:
                doc.encode("utf-8")
            except UnicodeEncodeError:
                where = f"{path.relative_to(ROOT)}:{line}"
                raise AssertionError(f"{where}: docstring not UTF-8") from None


def _kernel_modules() -> list[Path]:
    return [path for path in sorted(KERNEL.glob("*.py")) if path.name != "__init__.py"]


TESTS = Path(__file__).parent


def test_every_kernel_module_has_its_test_module() -> None:
    for path in _kernel_modules():
        expected = TESTS / "kernel" / f"test_{path.stem.lstrip('_')}.py"
        assert expected.exists(), f"{path.name} has no {expected.relative_to(ROOT)}"


#: Adapters modules tested through another module's tests, and why.
TESTED_THROUGH = {
    # CrewAI's side of the crewai adapter: only reachable through a CrewAIOrchestrator.
    "adapters/llm/_crewai_agents.py": "tests/adapters/llm/crewai/test_crewai.py",
    # The capacity's server-side scripts: their edge cases are the capacity's.
    "adapters/valkey/_lua.py": "tests/adapters/valkey/test_capacity.py",
    # The shared provider budget's server-side script: its edge cases are the budget's.
    "adapters/valkey/_budget_lua.py": "tests/adapters/valkey/test_budget.py",
}


def _adapters_modules() -> list[Path]:
    """Every adapters module but package files and the old paths kept for compatibility."""
    from adapters._moved import CONTRACT, DEPRECATED

    kept = {name.replace(".", "/") + ".py" for name in (*CONTRACT, *DEPRECATED)}
    return [
        path
        for path in sorted((ROOT / "adapters").rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py")
        and str(path.relative_to(ROOT)) not in kept
    ]


def _test_module_for(path: Path) -> Path:
    """tests/ mirrors adapters/: adapters/<group>/<m>.py -> tests/adapters/<group>/test_<m>.py,
    the CLI's at tests/cli/, CrewAI's in tests/adapters/llm/crewai/ (its own environment)."""
    parts = path.relative_to(ROOT / "adapters").parts
    name = f"test_{path.stem.lstrip('_')}.py"
    if parts[0] == "cli":
        return TESTS / "cli" / name
    folder = TESTS.joinpath("adapters", *parts[:-1])
    if path.stem == "crewai":
        folder = folder / "crewai"
    return folder / name


def test_every_adapters_module_has_its_test_module() -> None:
    for path in _adapters_modules():
        where = str(path.relative_to(ROOT))
        expected = TESTS.parent / TESTED_THROUGH.get(where, "")
        if where not in TESTED_THROUGH:
            expected = _test_module_for(path)
        assert expected.is_file(), f"{where} has no {expected.relative_to(ROOT)}"


def test_no_test_module_is_left_outside_the_mirror() -> None:
    """A test module sits beside the tests of the code it tests (named for it), in
    properties/ (hypothesis properties over the whole), or is one of the few that test the
    project as a whole."""
    mirrored = {_test_module_for(p) for p in _adapters_modules()} | {
        TESTS / "kernel" / f"test_{p.stem.lstrip('_')}.py" for p in _kernel_modules()
    }
    mirrored |= {TESTS.parent / t for t in TESTED_THROUGH.values()}
    mirrored |= {_test_module_for_deploy(p) for p in _deploy_files()}
    # examples/x.py -> tests/examples/test_x.py: the examples run as the README shows them.
    mirrored |= {TESTS / "examples" / f"test_{p.stem}.py" for p in (ROOT / "examples").glob("*.py")}
    whole = {"test_acceptance.py", "test_architecture.py", "test_benchmarks.py", "test_readme.py"}
    extra = {
        TESTS / "adapters" / "valkey" / "test_cluster.py",  # several processes, one server
        TESTS / "adapters" / "llm" / "crewai" / "test_crewai_cli.py",  # `conclave --backend crewai`
    }
    for path in sorted(TESTS.rglob("test_*.py")):
        if path.parent == TESTS and path.name in whole:
            continue
        if path.parent == TESTS / "properties" or path in mirrored or path in extra:
            continue
        raise AssertionError(f"{path.relative_to(ROOT)} tests no module of its own name")


#: Old paths kept for compatibility: nothing in the project imports them (only their
#: own test, tests/adapters/test_moved.py, and the crewai one).
def test_nothing_in_the_project_imports_an_old_path() -> None:
    from adapters._moved import CONTRACT, DEPRECATED

    old = {*CONTRACT, *DEPRECATED}
    for folder in ("adapters", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.name == "_moved.py" or path.name in ("test_moved.py", "test_crewai.py"):
                continue
            hit = old & _imported(path)
            assert not hit, f"{path.relative_to(ROOT)} imports {hit.pop()} (use its new path)"


def _imported(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_only_the_cli_imports_the_cli() -> None:
    """The CLI sits on top: no other adapter depends on it."""
    for path in _adapters_modules():
        if path.relative_to(ROOT / "adapters").parts[0] == "cli":
            continue
        cli = {n for n in _imported(path) if n == "adapters.cli" or n.startswith("adapters.cli.")}
        assert not cli, f"{path.relative_to(ROOT)} imports {cli.pop()}"


def _deploy_files() -> list[Path]:
    """What the project ships for operators (deploy/: Prometheus rules, ...); a tool's own
    test files beside them (``*.test.yml``, promtool's) are run by the mirrored module."""
    found = (ROOT / "deploy").rglob("*.yml")
    return sorted(p for p in found if p.is_file() and not p.name.endswith(".test.yml"))


def _test_module_for_deploy(path: Path) -> Path:
    """deploy/<tool>/<f>.yml -> tests/deploy/<tool>/test_<f>.py."""
    parts = path.relative_to(ROOT / "deploy").parts
    return TESTS.joinpath("deploy", *parts[:-1], f"test_{path.stem}.py")


def test_every_deploy_file_has_its_test_module() -> None:
    for path in _deploy_files():
        expected = _test_module_for_deploy(path)
        assert expected.is_file(), f"{path.relative_to(ROOT)} has no {expected.relative_to(ROOT)}"
