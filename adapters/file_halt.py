"""Old path of :mod:`adapters.halt.file`, kept: the public contract names it (see
:mod:`adapters._moved`)."""

from adapters.halt.file import *  # noqa: F403
from adapters.halt.file import __all__ as __all__
