"""Deprecated old path of :mod:`adapters.halt.document` (see :mod:`adapters._moved`)."""

from adapters._moved import warn_moved

warn_moved(__name__, "adapters.halt.document")

from adapters.halt.document import *  # noqa: E402, F403
from adapters.halt.document import __all__ as __all__  # noqa: E402
