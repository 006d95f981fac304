"""Old path of :mod:`adapters.llm.bridge`, kept: the public contract names it (see
:mod:`adapters._moved`)."""

from adapters.llm.bridge import *  # noqa: F403
from adapters.llm.bridge import __all__ as __all__
