"""The old import paths of the modules that moved when adapters/ was grouped by kind:
those the public contract names re-export their module silently; the others re-export
it with a DeprecationWarning naming the new path."""

from __future__ import annotations

import importlib
import sys
import warnings

import pytest

from adapters._moved import CONTRACT, DEPRECATED


def fresh_import(name: str) -> object:
    """``name`` imported anew (its body run again), as a first import would run it."""
    sys.modules.pop(name, None)
    return importlib.import_module(name)


def test_the_contract_names_every_moved_path_it_lists() -> None:
    # the crewai path needs crewai (its own environment): tested in crewai/test_crewai.py
    assert set(CONTRACT) >= {
        "adapters.asyncio_bridge",
        "adapters.openai_chat",
        "adapters.file_halt",
        "adapters.sqlite_witness",
    }


@pytest.mark.parametrize("old", sorted(set(CONTRACT) - {"adapters.crewai"}))
def test_a_contract_path_re_exports_its_module_without_a_warning(old: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module = fresh_import(old)
    new = importlib.import_module(CONTRACT[old])
    assert module.__all__ == new.__all__  # type: ignore[attr-defined]
    for name in new.__all__:
        assert getattr(module, name) is getattr(new, name), name


@pytest.mark.parametrize("old", sorted(DEPRECATED))
def test_another_old_path_still_works_and_warns_where_its_module_went(old: str) -> None:
    with pytest.warns(DeprecationWarning, match=rf"{old} is deprecated.*use {DEPRECATED[old]}"):
        module = fresh_import(old)
    new = importlib.import_module(DEPRECATED[old])
    for name in new.__all__:
        assert getattr(module, name) is getattr(new, name), name


def test_the_warning_points_at_the_import_not_at_the_shim() -> None:
    sys.modules.pop("adapters.transcript", None)
    with pytest.warns(DeprecationWarning, match="adapters.transcript") as caught:
        import adapters.transcript  # noqa: F401
    assert caught[0].filename == __file__


def test_the_cli_packages_old_names_still_work_with_a_warning() -> None:
    import adapters.cli
    from adapters.cli import commands

    assert adapters.cli.main is commands.main  # the entry point: no warning
    with pytest.warns(DeprecationWarning, match="use adapters.cli.commands.build_parser"):
        assert adapters.cli.build_parser is commands.build_parser
    with pytest.raises(AttributeError):
        _ = adapters.cli.no_such_name
