"""Old path of :mod:`adapters.witness.sqlite`, kept: the public contract names it (see
:mod:`adapters._moved`)."""

from adapters.witness.sqlite import *  # noqa: F403
from adapters.witness.sqlite import __all__ as __all__
