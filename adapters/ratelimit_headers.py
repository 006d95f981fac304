"""Deprecated old path of :mod:`adapters.llm.ratelimit_headers` (see :mod:`adapters._moved`)."""

from adapters._moved import warn_moved

warn_moved(__name__, "adapters.llm.ratelimit_headers")

from adapters.llm.ratelimit_headers import *  # noqa: E402, F403
from adapters.llm.ratelimit_headers import __all__ as __all__  # noqa: E402
