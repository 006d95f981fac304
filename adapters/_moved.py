"""The import paths modules had before ``adapters/`` was grouped by kind.

Two kinds of old path stay importable, each a thin re-export of the module's new home:

* :data:`CONTRACT` -- the paths the public API contract names: they are the contract, so
  they stay, silently (no warning: a user's acceptance check imports them, and a warning
  there is an error under ``-W error``).
* :data:`DEPRECATED` -- every other public old path: it works for one more release and
  says where the module went (a :class:`DeprecationWarning`).

Private modules (underscore names) just moved.
"""

from __future__ import annotations

import warnings

__all__ = ["CONTRACT", "DEPRECATED", "warn_moved"]

#: Old path -> new path, kept without a warning.
CONTRACT = {
    "adapters.asyncio_bridge": "adapters.llm.bridge",
    "adapters.openai_chat": "adapters.llm.openai_chat",
    "adapters.crewai": "adapters.llm.crewai",
    "adapters.file_halt": "adapters.halt.file",
    "adapters.sqlite_witness": "adapters.witness.sqlite",
}

#: Old path -> new path, kept for one release with a DeprecationWarning.
DEPRECATED = {
    "adapters.provider_budget": "adapters.llm.provider_budget",
    "adapters.ratelimit_headers": "adapters.llm.ratelimit_headers",
    "adapters.http_guard": "adapters.llm.http_guard",
    "adapters.halt_doc": "adapters.halt.document",
    "adapters.transcript": "adapters.cli.transcript",
}


def warn_moved(old: str, new: str) -> None:
    """Warn, pointing at the import that used ``old`` (called from the old module's body
    or ``__getattr__``: the frames between are the import system's, which ``warnings``
    skips)."""
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release: use {new}",
        DeprecationWarning,
        stacklevel=3,
    )
