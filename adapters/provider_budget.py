"""Deprecated old path of :mod:`adapters.llm.provider_budget` (see :mod:`adapters._moved`)."""

from adapters._moved import warn_moved

warn_moved(__name__, "adapters.llm.provider_budget")

from adapters.llm.provider_budget import *  # noqa: E402, F403
from adapters.llm.provider_budget import __all__ as __all__  # noqa: E402
