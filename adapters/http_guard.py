"""Deprecated old path of :mod:`adapters.llm.http_guard` (see :mod:`adapters._moved`)."""

from adapters._moved import warn_moved

warn_moved(__name__, "adapters.llm.http_guard")

from adapters.llm.http_guard import *  # noqa: E402, F403
from adapters.llm.http_guard import __all__ as __all__  # noqa: E402
