"""The ``conclave`` command: :mod:`adapters.cli.commands` (the parser and the commands),
``_backend`` (what a run opens), ``_display`` (progress and summary), ``_halt`` (halt,
clear, status over any :class:`~kernel.HaltControl`), ``_valkey`` (``--valkey``) and
:mod:`adapters.cli.transcript` (the ``--json`` transcript).

``adapters.cli.main`` is the console entry point.  The module's other names were
importable from ``adapters.cli`` before it became a package; they still are, with a
:class:`DeprecationWarning`: import them from :mod:`adapters.cli.commands`.
"""

from __future__ import annotations

from typing import Any

from adapters._moved import warn_moved
from adapters.cli import commands
from adapters.cli.commands import main

__all__ = ["main"]


def __getattr__(name: str) -> Any:
    if not name.startswith("_") and hasattr(commands, name):
        warn_moved(f"adapters.cli.{name}", f"adapters.cli.commands.{name}")
        return getattr(commands, name)
    raise AttributeError(f"module 'adapters.cli' has no attribute {name!r}")
