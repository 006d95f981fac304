"""Deprecated old path of :mod:`adapters.cli.transcript` (see :mod:`adapters._moved`)."""

from adapters._moved import warn_moved

warn_moved(__name__, "adapters.cli.transcript")

from adapters.cli.transcript import *  # noqa: E402, F403
from adapters.cli.transcript import __all__ as __all__  # noqa: E402
