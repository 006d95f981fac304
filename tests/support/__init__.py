"""What the tests share: fakes (a loopback OpenAI-compatible server, a Valkey server),
scripted parts, hostile parts, and the helpers that run the CLI as a user does."""

from pathlib import Path

#: The repository's root: where subprocesses run (``python -m adapters.cli``, ...).
ROOT = Path(__file__).resolve().parent.parent.parent
