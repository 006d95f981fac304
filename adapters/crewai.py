"""Old path of :mod:`adapters.llm.crewai`, kept: the public contract names it (see
:mod:`adapters._moved`)."""

from adapters.llm.crewai import *  # noqa: F403
from adapters.llm.crewai import __all__ as __all__
