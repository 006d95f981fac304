"""Old path of :mod:`adapters.llm.openai_chat`, kept: the public contract names it (see
:mod:`adapters._moved`)."""

from adapters.llm.openai_chat import *  # noqa: F403
from adapters.llm.openai_chat import __all__ as __all__
