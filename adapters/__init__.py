"""Adapters that plug into the kernel's ports: orchestrators, halt channels, witnesses, CLI."""

import logging as _logging

_logging.getLogger("adapters").addHandler(_logging.NullHandler())
